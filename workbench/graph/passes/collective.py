"""Fusion across the collective: the all-reduce after a row-parallel linear, with the residual add and the RMSNorm
that read its sum, become one op (``kernels/collectives.py``).

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
