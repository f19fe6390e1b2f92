"""Passes for the LayerNorm families: GPT-2, GPT-NeoX (Pythia) and Falcon.

Each runs in ``DEFAULT_PIPELINE`` (matching nothing in the Llama family's graphs) and is written as the chain it
expects (after ``eliminate_noops``: no dropouts, no identity casts):

    linear_from_matmul   view(addmm(b, view(x, [-1, K]), W), [.., N]) -> linear(x, Wᵀ, b)   GPT-2's Conv1D, whose
                         weight W [K, N] is stored transposed (Wᵀ: a derived parameter, ``{W}.T``);
                         matmul(x, numpy_T(W)) -> linear(x, W)                             Falcon's bias-free linears
    fuse_layer_norm      aten.layer_norm over the last dim -> workbench.layer_norm
    fuse_add_layer_norm  layer_norm(add(x, r)) -> workbench.add_layer_norm (sum kept); with a parallel residual
                         (NeoX, Falcon) the second norm of the same sum reads the fused op's sum
    fuse_gelu            GPT-2's 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) chain, or aten.gelu, read only by
                         linears (a plain MLP; a gated GELU is another pattern) -> workbench.gelu
    fuse_partial_rope    cat([rope(x[.., :r], cos, sin), x[.., r:]], -1) -> workbench.partial_rope(x, cos, sin)
                         (NeoX's rotary over the first rotary_pct of each head, after ``fuse_rope``)

``FAMILY_LAYER_FUSIONS`` (in the manager) names the fusions each of these architectures gets in every decoder
layer: what ``unfused_lines`` checks for them instead of the Llama family's ``LAYER_FUSIONS``.
"""

from __future__ import annotations

from ..ir import Node, Param, Ref, TensorSpec
from ..rewrite import Rewriter
from .fuse import _fuse_chains, _getitem, _is_op, _new
from .manager import FAMILY_LAYER_FUSIONS, Match, register_pass

_VIEWS = ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")


def _weight(rw: Rewriter, v) -> Param | None:
    """The parameter ``v`` names when it is a 2-D weight, else None."""
    p = rw.graph.params.get(v.name) if isinstance(v, Ref) else None
    return p if p is not None and p.kind == "parameter" and len(p.spec.shape) == 2 else None


def _transposed(rw: Rewriter, p: Param) -> Ref:
    """A derived parameter holding ``p`` transposed (made once, shared by every reader)."""
    name = f"{p.name}.T"
    if name not in rw.graph.params:
        k, n = p.spec.shape
        rw.graph.params[name] = Param(name, "parameter", TensorSpec([n, k], p.spec.dtype), [],
                                      {"op": "transpose", "dims": [0, 1], "inputs": [[p.name, p.aliases]]})
    return Ref(name)


def _match_conv1d(rw: Rewriter, n: Node):
    """(linear's args, swallowed nodes) if ``n`` is addmm(b, x2, W) with W a [K, N] weight: the linear reads x where
    x2 = view(x, [-1, K]) and the result is only viewed back to x's leading dims (then ``n`` is that view); else
    x2 itself (the result stays 2-D)."""
    if n.op in _VIEWS:
        addmm = rw.only_reader(n.args[0], n)
        if not _is_op(addmm, "aten.addmm.default"):
            return None
    elif n.op == "aten.addmm.default":
        addmm = n
    else:
        return None
    if len(addmm.args) != 3 or addmm.kwargs:
        return None
    bias, flat, w = addmm.args
    p = _weight(rw, w)
    if p is None:
        return None
    if addmm is n:
        # read by anything but a view back (the view's own match takes it otherwise)
        readers = rw.users.get(n.name, [])
        if len(readers) == 1 and readers[0].op in _VIEWS and _match_conv1d(rw, readers[0]) is not None:
            return None
        return [flat, _transposed(rw, p), bias], []
    inner = rw.only_reader(flat, addmm)
    x = rw.spec(inner.args[0]) if inner is not None and inner.op in _VIEWS else None
    if x is None or n.out is None or x.shape[:-1] != n.out.shape[:-1] or x.shape[-1] != p.spec.shape[0]:
        return None
    return [inner.args[0], _transposed(rw, p), bias], [inner, addmm]


@register_pass("linear_from_matmul", "GPT-2's Conv1D (addmm on a transposed weight) and Falcon's matmul(x, W.T) "
                                     "-> aten.linear")
def linear_from_matmul(rw: Rewriter) -> list[Match]:
    matches = []
    for n in list(rw.graph.nodes):
        found = _match_conv1d(rw, n)
        if found is not None:
            args, swallowed = found
        elif n.op == "aten.matmul.default" and len(n.args) == 2:
            t = rw.only_reader(n.args[1], n)
            p = _weight(rw, t.args[0]) if _is_op(t, "aten.numpy_T.default") else None
            x = rw.spec(n.args[0])
            if p is None or x is None or len(x.shape) < 2 or x.shape[-1] != p.spec.shape[1]:
                continue
            args, swallowed = [n.args[0], Ref(p.name)], [t]
        else:
            continue
        linear = _new(rw, n, "linear", "aten.linear.default", args, [n.out], n)
        rw.replace_uses(n.name, Ref(linear.name))
        matches.append(Match("linear", n.layer, [m.name for m in swallowed] + [n.name], [linear.name]))
    return matches


def _match_layer_norm(rw: Rewriter, n: Node):
    if n.op != "aten.layer_norm.default" or n.kwargs or n.out is None:
        return None
    x, shape, w, b, eps = (list(n.args) + [None, None, 1e-5])[:5]
    if list(shape) != [n.out.shape[-1]]:
        return None
    return [x, w, b, eps], []


@register_pass("fuse_layer_norm", "LayerNorm over the last dim -> workbench.layer_norm")
def fuse_layer_norm(rw: Rewriter) -> list[Match]:
    return _fuse_chains(rw, _match_layer_norm, "workbench.layer_norm", "layer_norm")


@register_pass("fuse_add_layer_norm", "residual add feeding a LayerNorm -> workbench.add_layer_norm (sum kept)")
def fuse_add_layer_norm(rw: Rewriter) -> list[Match]:
    matches = []
    for n in list(rw.graph.nodes):
        if n.op != "workbench.layer_norm":
            continue
        add = rw.producer(n.args[0])
        if not (_is_op(add, "aten.add.Tensor") and len(add.args) == 2 and all(isinstance(a, Ref) for a in add.args)
                and rw.spec(add.args[0]).shape == rw.spec(add.args[1]).shape):
            continue
        anchor = next(u for u in rw.graph.nodes if u in rw.users[add.name])
        fused = _new(rw, anchor, "add_layer_norm", "workbench.add_layer_norm", [add.args[0], add.args[1], *n.args[1:]],
                     [n.out, add.out], n)
        normed, total = _getitem(rw, anchor, fused, 0), _getitem(rw, anchor, fused, 1)
        rw.replace_uses(n.name, Ref(normed.name))
        rw.replace_uses(add.name, Ref(total.name))  # a parallel residual's other norm reads the sum
        matches.append(Match("add_layer_norm", n.layer, [add.name, n.name], [fused.name]))
    return matches


def _scalar_mul(rw: Rewriter, n: Node | None, value: float):
    """The tensor operand of ``n`` = mul(t, value) (either order), else None."""
    if not _is_op(n, "aten.mul.Tensor") or len(n.args) != 2:
        return None
    a, b = n.args
    if isinstance(b, float) and abs(b - value) < 1e-12 * max(1.0, abs(value)):
        return a
    if isinstance(a, float) and abs(a - value) < 1e-12 * max(1.0, abs(value)):
        return b
    return None


def _match_gelu_tanh(rw: Rewriter, n: Node):
    """x if ``n`` ends GPT-2's mul(mul(x, 0.5), add(tanh(mul(add(x, mul(pow(x, 3), 0.044715)), √(2/π))), 1)),
    with the nodes it swallows."""
    from ...kernels.fused_ln import SQRT_2_OVER_PI

    if n.op != "aten.mul.Tensor" or len(n.args) != 2 or not all(isinstance(a, Ref) for a in n.args):
        return None
    half, one = rw.only_reader(n.args[0], n), rw.only_reader(n.args[1], n)
    x = _scalar_mul(rw, half, 0.5)
    if x is None or not (_is_op(one, "aten.add.Tensor") and one.args[1] == 1.0):
        return None
    tanh = rw.only_reader(one.args[0], one)
    if not _is_op(tanh, "aten.tanh.default"):
        return None
    scaled = rw.only_reader(tanh.args[0], tanh)
    inner = _scalar_mul(rw, scaled, SQRT_2_OVER_PI)
    add = rw.only_reader(inner, scaled) if inner is not None else None
    if not (_is_op(add, "aten.add.Tensor") and add.args[0] == x):
        return None
    cubic = rw.only_reader(add.args[1], add)
    cube = rw.only_reader(_scalar_mul(rw, cubic, 0.044715), cubic) if cubic is not None else None
    if not (_is_op(cube, "aten.pow.Tensor_Scalar") and cube.args[0] == x and cube.args[1] == 3.0):
        return None
    return x, [half, one, tanh, scaled, add, cubic, cube]


def _match_gelu(rw: Rewriter, n: Node):
    if n.op == "aten.gelu.default" and len(n.args) == 1:
        approximate = n.kwargs.get("approximate", "none")
        found = (n.args[0], []) if approximate in ("none", "tanh") else None
    else:
        approximate, found = "tanh", _match_gelu_tanh(rw, n)
    readers = rw.users.get(n.name, [])
    if found is None or not readers or n.name in rw.graph.outputs \
            or not all(u.op == "aten.linear.default" and u.args[0] == Ref(n.name) for u in readers):
        return None
    return [found[0], approximate], found[1]


@register_pass("fuse_gelu", "GELU of a plain MLP (GPT-2's tanh formula, aten.gelu) read by linears -> workbench.gelu")
def fuse_gelu(rw: Rewriter) -> list[Match]:
    return _fuse_chains(rw, _match_gelu, "workbench.gelu", "gelu")


def _match_partial_rope(rw: Rewriter, n: Node):
    if n.op != "aten.cat.default" or len(n.args[0]) != 2 or n.out is None:
        return None
    last = len(n.out.shape) - 1
    if (n.args[1] if len(n.args) > 1 else 0) not in (-1, last):
        return None
    rope, rest = (rw.only_reader(v, n) for v in n.args[0])
    if not (_is_op(rope, "workbench.rope") and _is_op(rest, "aten.slice.Tensor")):
        return None
    head = rw.only_reader(rope.args[0], rope)
    if not _is_op(head, "aten.slice.Tensor") or head.args[0] != rest.args[0]:
        return None
    rot = rw.spec(rope.args[1])
    x = rw.spec(head.args[0])
    if rot is None or x is None or x.shape != n.out.shape or not isinstance(rot.shape[-1], int):
        return None
    r = rot.shape[-1]
    if head.args[1] not in (-1, last) or rest.args[1] not in (-1, last) or list(head.args[2:4]) != [0, r] \
            or rest.args[2] != r or (len(rest.args) > 3 and rest.args[3] < x.shape[-1]):
        return None
    return [head.args[0], rope.args[1], rope.args[2]], [rope, rest, head]


@register_pass("fuse_partial_rope", "rotary over the first dims of each head, the rest passed through "
                                    "-> workbench.partial_rope")
def fuse_partial_rope(rw: Rewriter) -> list[Match]:
    return _fuse_chains(rw, _match_partial_rope, "workbench.partial_rope", "partial_rope")


FAMILY_LAYER_FUSIONS.update({
    # a pre-norm layer (residual adds feed the next norm, as in Llama), the packed c_attn split by slices
    "GPT2LMHeadModel": ("linear_from_matmul", "fuse_layer_norm", "fuse_add_layer_norm", "fuse_gelu",
                        "fuse_attention", "fuse_parallel_linears", "insert_paged_attention"),
    # parallel residual: layer 0's norms read the embedding, so the residual add + norm is in layers 1.. only
    # (checked by the tests, not here); partial RoPE stays its own op before the attention, a rotary over the
    # whole head (rotary_pct 1) moves into it
    "GPTNeoXForCausalLM": ("fuse_layer_norm", "fuse_gelu", "fuse_rope",
                           ("fuse_partial_rope", "fuse_rope_into_attention"), "fuse_attention",
                           "insert_paged_attention"),
    "FalconForCausalLM": ("linear_from_matmul", "fuse_layer_norm", "fuse_gelu", "fuse_rope", "fuse_attention",
                          "insert_paged_attention", "fuse_rope_into_attention"),
})
