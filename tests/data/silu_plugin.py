"""A plugin as a user writes one (tests/test_plugins.py loads it with --plugin, tests/test_passes.py in process):
its own op, and a pass placed where the op's pattern still exists (fuse_silu_mul consumes aten.silu later)."""

import torch

from workbench.graph.ir import Node, Ref
from workbench.graph.passes import Match, register_pass
from workbench.kernels import register_op


@register_op("myplugin.silu", graph_safe=True)
def silu(x):
    """My own SiLU."""
    return torch.nn.functional.silu(x)


@register_pass("myplugin_own_silu", "aten.silu -> myplugin.silu", after="fuse_rms_norm")
def own_silu(rw):
    matches = []
    for n in list(rw.graph.nodes):
        if n.op == "aten.silu.default":
            mine = rw.insert_before(n, Node(rw.fresh("own_silu"), "myplugin.silu", list(n.args), {}, [n.out],
                                            n.module, n.layer))
            rw.replace_uses(n.name, Ref(mine.name))
            matches.append(Match("own_silu", n.layer, [n.name], [mine.name]))
    return matches
