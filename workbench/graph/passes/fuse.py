"""Vertical fusion: chains of ops that become one fused op (see ``workbench/kernels/fused.py``).

Each pattern is matched structurally on the IR, after ``eliminate_noops`` (so fp32
graphs have no identity casts left), and is written as the chain it expects:

    rms_norm      mul(w, [to(] mul(a, rsqrt(add(mean(pow(a, 2), [-1], True), eps))) [)]),  a = [to(]x[)]
                  Gemma's: [to(] mul(mul(a, rsqrt(..)), add([to(]w[)], 1.0)) [)]: the 1 folded into a derived
                  fp32 weight (1 + w, computed when weights are loaded), then the same op (which, given an fp32
                  weight over 16-bit x, rounds once after it, as Gemma does)
    add_rms_norm  rms_norm(add(x, r)) where the sum is also the next residual
    norm_add_rms_norm  add_rms_norm(rms_norm(x), r): Gemma's post-norm, the residual add and the next norm
    silu_mul      mul(silu(gate), up);  gelu_mul: mul(gelu(gate, approximate="tanh"), up) (GeGLU)
    softcap       mul(tanh(div(x, c)), c)  (Gemma 2's final logits; its attention scores' go into the attention)
    rope          add(mul(x, cos), mul(cat([neg(slice(x, -1, h:)), slice(x, -1, :h)]), sin))
    attention     sdpa(q, repeat_kv(k), repeat_kv(v), mask)  with  repeat_kv = reshape(expand(unsqueeze(·, 2))),
                  or the eager form (Gemma 2): matmul([to(]softmax([add(] [softcap(] mul(matmul(q,
                  transpose(repeat_kv(k))), scale) [)] [, mask)], -1)[)], repeat_kv(v))

Intermediates a pattern swallows must have no other readers; otherwise it does not match.
"""

from __future__ import annotations

from typing import Any

from ..ir import Node, Param, Ref, TensorSpec
from ..rewrite import Rewriter
from .manager import Match, register_pass


def _is_op(n: Node | None, op: str) -> bool:
    return n is not None and n.op == op


def _unwrap_cast(rw: Rewriter, v: Any) -> Any:
    n = rw.producer(v)
    return n.args[0] if _is_op(n, "aten.to.dtype") else v


def _new(rw: Rewriter, anchor: Node, base: str, op: str, args: list, outputs: list[TensorSpec | None],
         like: Node, kwargs: dict | None = None) -> Node:
    node = Node(rw.fresh(base), op, args, kwargs or {}, outputs, like.module, like.layer)
    return rw.insert_before(anchor, node)


def _getitem(rw: Rewriter, anchor: Node, src: Node, i: int) -> Node:
    return _new(rw, anchor, f"{src.name}_out{i}", "operator.getitem", [Ref(src.name), i], [src.outputs[i]], src)


def _match_rms_norm(rw: Rewriter, n: Node):
    """(x, weight, eps) if ``n`` ends an RMSNorm chain, else None."""
    if n.op != "aten.mul.Tensor" or len(n.args) != 2:
        return None
    w, y = n.args
    if not (isinstance(w, Ref) and w.name in rw.graph.params and len(rw.graph.params[w.name].spec.shape) == 1):
        return None
    cast_back = rw.only_reader(y, n)
    if _is_op(cast_back, "aten.to.dtype"):
        scaled = rw.only_reader(cast_back.args[0], cast_back)
    else:
        cast_back, scaled = None, cast_back
    core = _rms_core(rw, scaled)
    if core is None:
        return None
    a, eps, nodes = core
    return [_unwrap_cast(rw, a), w, eps], [cast_back, scaled, *nodes]


def _rms_core(rw: Rewriter, scaled: Node | None) -> tuple[Any, float, list[Node]] | None:
    """``a * rsqrt(mean(a ** 2, -1, keepdim) + eps)`` read back from its ``scaled`` product: (a, eps, the
    product's nodes from the rsqrt down), or None."""
    if not _is_op(scaled, "aten.mul.Tensor"):
        return None
    a, r = scaled.args
    rsqrt = rw.only_reader(r, scaled)
    if not _is_op(rsqrt, "aten.rsqrt.default"):
        return None
    add = rw.only_reader(rsqrt.args[0], rsqrt)
    if not (_is_op(add, "aten.add.Tensor") and isinstance(add.args[1], float)):
        return None
    mean = rw.only_reader(add.args[0], add)
    if not (_is_op(mean, "aten.mean.dim") and list(mean.args[1]) == [-1] and mean.args[2] is True):
        return None
    pow_ = rw.only_reader(mean.args[0], mean)
    if not (_is_op(pow_, "aten.pow.Tensor_Scalar") and pow_.args[0] == a and pow_.args[1] == 2):
        return None
    return a, add.args[1], [rsqrt, add, mean, pow_]


def _fuse_chains(rw: Rewriter, match, op: str, what: str) -> list[Match]:
    """Replace every chain ``match(rw, last_node) -> (fused op args, swallowed nodes)`` finds by one ``op``."""
    matches = []
    for n in list(rw.graph.nodes):
        found = match(rw, n)
        if found is None:
            continue
        args, swallowed = found
        fused = _new(rw, n, what, op, args, [n.out], n)
        rw.replace_uses(n.name, Ref(fused.name))
        matches.append(Match(what, n.layer, [m.name for m in swallowed if m is not None] + [n.name], [fused.name]))
    return matches


#: What a Gemma norm's match is reported as: the (1 + w) is in the derived weight, not computed per token.
UNIT_OFFSET = "rms_norm (1 + w folded into the weight)"


def _unit_offset_weight(rw: Rewriter, v, reader: Node):
    """The 1-D weight w if ``v`` is add([to(]w[)], 1.0) read only by ``reader`` (Gemma's 1 + w)."""
    add = rw.only_reader(v, reader)
    if not (_is_op(add, "aten.add.Tensor") and len(add.args) == 2 and add.args[1] == 1.0):
        return None
    w = add.args[0]
    cast = rw.only_reader(w, add)
    if _is_op(cast, "aten.to.dtype"):
        w = cast.args[0]
    g = rw.graph
    if not (isinstance(w, Ref) and w.name in g.params and len(g.params[w.name].spec.shape) == 1):
        return None
    return w.name, [add, cast if _is_op(cast, "aten.to.dtype") else None]


def _match_unit_offset_rms_norm(rw: Rewriter, n: Node):
    """(x, w name, eps) and the swallowed nodes if ``n`` ends a Gemma RMSNorm: normed * (1 + w), then cast back
    to x's dtype where x is not fp32."""
    end = n
    core = n
    if n.op in ("aten.type_as.default", "aten.to.dtype"):
        core = rw.only_reader(n.args[0], n)
    if not _is_op(core, "aten.mul.Tensor") or len(core.args) != 2:
        return None
    for i in (0, 1):
        found = _unit_offset_weight(rw, core.args[i], core)
        scaled = rw.only_reader(core.args[1 - i], core)
        if found is not None and _is_op(scaled, "aten.mul.Tensor"):
            break
    else:
        return None
    weight, offset_nodes = found
    rms = _rms_core(rw, scaled)
    if rms is None:
        return None
    a, eps, nodes = rms
    x = _unwrap_cast(rw, a)
    x_spec = rw.spec(x)
    if x_spec is None or end.out is None or end.out.dtype != x_spec.dtype:
        return None
    swallowed = [*offset_nodes, scaled, *nodes] + ([core] if core is not end else [])
    return [x, weight, eps], swallowed


def _unit_offset_param(rw: Rewriter, weight: str) -> Ref:
    """The derived weight 1 + w, computed and kept in fp32 whatever the graph's dtype: ``workbench.rms_norm`` with
    an fp32 weight over 16-bit x rounds once after it, as Gemma does (1 + w rounded to bf16 would be up to half a
    bf16 step off before the product's own rounding)."""
    g = rw.graph
    name = f"{weight}.plus_one"
    if name not in g.params:
        p = g.params[weight]
        g.params[name] = Param(name, "parameter", TensorSpec(list(p.spec.shape), "float32"), [],
                               {"op": "offset", "value": 1.0, "inputs": [[p.name, p.aliases]]})
    return Ref(name)


@register_pass("fuse_rms_norm", "RMSNorm chains (pow/mean/add/rsqrt/mul/cast/mul) -> workbench.rms_norm; Gemma's "
                                "(1 + w) with the 1 folded into a derived weight")
def fuse_rms_norm(rw: Rewriter) -> list[Match]:
    matches = _fuse_chains(rw, _match_rms_norm, "workbench.rms_norm", "rms_norm")
    for n in list(rw.graph.nodes):
        found = _match_unit_offset_rms_norm(rw, n)
        if found is None:
            continue
        (x, weight, eps), swallowed = found
        w = _unit_offset_param(rw, weight)
        fused = _new(rw, n, "rms_norm", "workbench.rms_norm", [x, w, eps], [n.out], n)
        rw.replace_uses(n.name, Ref(fused.name))
        matches.append(Match(UNIT_OFFSET, n.layer, [m.name for m in swallowed if m is not None] + [n.name],
                             [fused.name, w.name]))
    return matches


@register_pass("fuse_add_rms_norm", "residual add feeding an RMSNorm -> workbench.add_rms_norm (sum kept)")
def fuse_add_rms_norm(rw: Rewriter) -> list[Match]:
    matches = []
    for n in list(rw.graph.nodes):
        if n.op != "workbench.rms_norm":
            continue
        add = rw.producer(n.args[0])
        if not (_is_op(add, "aten.add.Tensor") and all(isinstance(a, Ref) for a in add.args)
                and rw.spec(add.args[0]).shape == rw.spec(add.args[1]).shape):
            continue
        anchor = next(u for u in rw.graph.nodes if u in rw.users[add.name])
        fused = _new(rw, anchor, "add_rms_norm", "workbench.add_rms_norm", [add.args[0], add.args[1], *n.args[1:]],
                     [n.out, add.out], n)
        normed, total = _getitem(rw, anchor, fused, 0), _getitem(rw, anchor, fused, 1)
        rw.replace_uses(n.name, Ref(normed.name))
        rw.replace_uses(add.name, Ref(total.name))
        matches.append(Match("add_rms_norm", n.layer, [add.name, n.name], [fused.name]))
    return matches


@register_pass("fuse_norm_add_rms_norm", "a norm's output added to the residual, feeding the next norm "
                                         "(Gemma's post-attention / post-MLP norms) -> workbench.norm_add_rms_norm")
def fuse_norm_add_rms_norm(rw: Rewriter) -> list[Match]:
    """Gemma normalizes the attention's and the MLP's outputs before the residual add, which feeds the next norm:
    rms_norm, then add_rms_norm become one op (one read of each input, the sum written once; a layer's launches
    then are a Llama layer's). Matches where the norm's output is read by the add alone and both share eps; the
    add_rms_norm node becomes the fused one, so its readers (the sum's and the normed value's) stay as they are."""
    matches = []
    for n in rw.graph.nodes:
        if n.op != "workbench.add_rms_norm" or len(n.args) != 4:
            continue
        for i in (0, 1):
            norm = rw.only_reader(n.args[i], n)
            if not (_is_op(norm, "workbench.rms_norm") and len(norm.args) == 3 and norm.args[2] == n.args[3]
                    and norm.out is not None and rw.spec(norm.args[0]) is not None
                    and rw.spec(norm.args[0]).dtype == norm.out.dtype):
                continue
            n.op = "workbench.norm_add_rms_norm"
            n.args = [norm.args[0], n.args[1 - i], norm.args[1], n.args[2], n.args[3]]
            matches.append(Match("norm_add_rms_norm", norm.layer, [norm.name, n.name], [n.name]))
            break
    if matches:
        rw.refresh()
    return matches


def _match_silu_mul(rw: Rewriter, n: Node):
    if n.op != "aten.mul.Tensor" or len(n.args) != 2:
        return None
    for i in (0, 1):
        silu = rw.only_reader(n.args[i], n)
        if _is_op(silu, "aten.silu.default"):
            return [silu.args[0], n.args[1 - i]], [silu]
    return None


def _match_gelu_mul(rw: Rewriter, n: Node):
    """GeGLU with the tanh GELU (Gemma's gelu_pytorch_tanh); the exact (erf) GELU is another function."""
    if n.op != "aten.mul.Tensor" or len(n.args) != 2:
        return None
    for i in (0, 1):
        gelu = rw.only_reader(n.args[i], n)
        if _is_op(gelu, "aten.gelu.default") and gelu.kwargs.get("approximate") == "tanh" and len(gelu.args) == 1:
            return [gelu.args[0], n.args[1 - i]], [gelu]
    return None


@register_pass("fuse_silu_mul", "gated MLP activations: SwiGLU mul(silu(gate), up) -> workbench.silu_mul, GeGLU "
                                "mul(gelu_tanh(gate), up) -> workbench.gelu_mul")
def fuse_silu_mul(rw: Rewriter) -> list[Match]:
    # one pass for both gates: a layer has one of them, and the report counts the gate fused in each layer
    return (_fuse_chains(rw, _match_silu_mul, "workbench.silu_mul", "silu_mul")
            + _fuse_chains(rw, _match_gelu_mul, "workbench.gelu_mul", "gelu_mul"))


def _match_softcap(rw: Rewriter, n: Node):
    if n.op != "aten.mul.Tensor" or len(n.args) != 2 or not isinstance(n.args[1], float):
        return None
    tanh = rw.only_reader(n.args[0], n)
    if not _is_op(tanh, "aten.tanh.default"):
        return None
    div = rw.only_reader(tanh.args[0], tanh)
    if not (_is_op(div, "aten.div.Tensor") and div.args[1] == n.args[1]):
        return None
    return [div.args[0], n.args[1]], [div, tanh]


@register_pass("fuse_softcap", "soft-capping mul(tanh(div(x, c)), c) -> workbench.softcap (Gemma 2)")
def fuse_softcap(rw: Rewriter) -> list[Match]:
    """Gemma 2's final-logit cap becomes one op (``select_logits_rows`` sees through it to the lm_head); the
    attention scores' cap becomes one too, which ``fuse_attention`` then takes into the attention."""
    return _fuse_chains(rw, _match_softcap, "workbench.softcap", "softcap")


def _match_rope(rw: Rewriter, n: Node):
    if n.op != "aten.add.Tensor" or len(n.args) != 2 or not all(isinstance(a, Ref) for a in n.args):
        return None
    m1, m2 = rw.only_reader(n.args[0], n), rw.only_reader(n.args[1], n)
    if not (_is_op(m1, "aten.mul.Tensor") and _is_op(m2, "aten.mul.Tensor")):
        return None
    x, cos = m1.args
    cat = rw.only_reader(m2.args[0], m2)
    if not (_is_op(cat, "aten.cat.default") and len(cat.args[0]) == 2 and cat.args[1] in (-1, 3)):
        return None
    neg, lo = rw.only_reader(cat.args[0][0], cat), rw.only_reader(cat.args[0][1], cat)
    if not (_is_op(neg, "aten.neg.default") and _is_op(lo, "aten.slice.Tensor")):
        return None
    hi = rw.only_reader(neg.args[0], neg)
    spec = rw.spec(x)
    if not (_is_op(hi, "aten.slice.Tensor") and hi.args[0] == x and lo.args[0] == x and spec is not None):
        return None
    last = len(spec.shape) - 1
    half = spec.shape[-1] // 2 if isinstance(spec.shape[-1], int) else None
    if half is None or hi.args[1] not in (-1, last) or lo.args[1] not in (-1, last):
        return None
    if list(lo.args[2:4]) != [0, half] or hi.args[2] != half:
        return None
    return [x, cos, m2.args[1]], [m1, m2, cat, neg, lo, hi]


@register_pass("fuse_rope", "rotary embedding x*cos + rotate_half(x)*sin -> workbench.rope (q and k)")
def fuse_rope(rw: Rewriter) -> list[Match]:
    return _fuse_chains(rw, _match_rope, "workbench.rope", "rope")


def _unrepeat(rw: Rewriter, v: Any, reader: Node):
    """k if ``v`` is repeat_kv(k) = reshape(expand(unsqueeze(k, 2))) read only by ``reader``."""
    reshape = rw.only_reader(v, reader)
    if not _is_op(reshape, "aten.reshape.default"):
        return None
    expand = rw.only_reader(reshape.args[0], reshape)
    if not _is_op(expand, "aten.expand.default"):
        return None
    unsq = rw.only_reader(expand.args[0], expand)
    if not (_is_op(unsq, "aten.unsqueeze.default") and unsq.args[1] == 2):
        return None
    return unsq.args[0], [reshape, expand, unsq]


def _match_eager_attention(rw: Rewriter, n: Node):
    """(q, k, v, mask, scale, softcap) and the swallowed nodes if ``n`` ends transformers' eager attention:
    matmul(softmax(scores [+ mask], -1, fp32) [cast], v) with scores = [softcap(] matmul(q, kᵀ) * scale [)]
    (the form Gemma 2 runs, having no SDPA path). None where an intermediate has another reader."""
    if n.op != "aten.matmul.default" or len(n.args) != 2:
        return None
    probs, v = n.args
    swallowed = []
    node = rw.only_reader(probs, n)
    if _is_op(node, "aten.to.dtype"):
        swallowed.append(node)
        node = rw.only_reader(node.args[0], node)
    if not (_is_op(node, "aten.softmax.int") and node.args[1] in (-1, 3)):
        return None
    swallowed.append(node)
    scores = node.args[0]
    mask = None
    node = rw.only_reader(scores, node)
    if _is_op(node, "aten.add.Tensor") and len(node.args) == 2 and isinstance(node.args[1], Ref):
        swallowed.append(node)
        scores, mask = node.args
        node = rw.only_reader(scores, node)
    softcap = None
    if _is_op(node, "workbench.softcap"):
        swallowed.append(node)
        softcap = node.args[1]
        node = rw.only_reader(node.args[0], node)
    if not (_is_op(node, "aten.mul.Tensor") and isinstance(node.args[1], float)):
        return None
    swallowed.append(node)
    scale = node.args[1]
    mm = rw.only_reader(node.args[0], node)
    if not (_is_op(mm, "aten.matmul.default") and len(mm.args) == 2):
        return None
    swallowed.append(mm)
    q, kt = mm.args
    t = rw.only_reader(kt, mm)
    if not (_is_op(t, "aten.transpose.int") and sorted(d % 4 for d in t.args[1:3]) == [2, 3]):
        return None
    swallowed.append(t)
    return [q, t.args[0], v, mask, scale], softcap, swallowed


@register_pass("fuse_attention", "SDPA (or eager attention) with repeat_kv on k and v -> workbench.attention reading "
                                 "shared KV heads")
def fuse_attention(rw: Rewriter) -> list[Match]:
    matches = []
    for n in list(rw.graph.nodes):
        eager = _match_eager_attention(rw, n)
        if eager is not None:
            (q, k, v, mask, scale), softcap, swallowed = eager
            for name, val in (("k", k), ("v", v)):
                found = _unrepeat(rw, val, swallowed[-1] if name == "k" else n)
                if found is not None:
                    swallowed += found[1]
                    k, v = (found[0], v) if name == "k" else (k, found[0])
            kwargs = {"softcap": softcap} if softcap is not None else {}
            fused = _new(rw, n, "attention", "workbench.attention", [q, k, v, mask, scale], [n.out], n, kwargs)
            rw.replace_uses(n.name, Ref(fused.name))
            repeat = any(m.op == "aten.unsqueeze.default" for m in swallowed)
            matches.append(Match("attention (repeat_kv removed)" if repeat else "attention", n.layer,
                                 [m.name for m in swallowed] + [n.name], [fused.name]))
            continue
        if n.op != "aten.scaled_dot_product_attention.default":
            continue
        extra = {k: v for k, v in n.kwargs.items() if k != "scale"}
        if extra or len(n.args) > 4:  # dropout/is_causal/gqa flags: leave such calls alone
            continue
        q, k, v = n.args[:3]
        mask = n.args[3] if len(n.args) > 3 else None
        swallowed: list[Node] = []
        for name, val in (("k", k), ("v", v)):
            found = _unrepeat(rw, val, n)
            if found is not None:
                swallowed += found[1]
                if name == "k":
                    k = found[0]
                else:
                    v = found[0]
        fused = _new(rw, n, "attention", "workbench.attention", [q, k, v, mask, n.kwargs.get("scale")], [n.out], n)
        rw.replace_uses(n.name, Ref(fused.name))
        what = "attention (repeat_kv removed)" if swallowed else "attention"
        matches.append(Match(what, n.layer, [m.name for m in swallowed] + [n.name], [fused.name]))
    return matches
