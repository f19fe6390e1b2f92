"""Node elimination: ops that do nothing in inference.

  * assertions (``_assert_tensor_metadata``, ``_assert_scalar``): no value, checked at capture;
  * identities: casts to the dtype a tensor already has, ``alias``, ``detach``, ``clone``
    (the graph is functional, nothing writes in place), ``contiguous`` of a contiguous
    tensor, ``dropout`` (inference), and ``slice``/``expand``/``view``/``reshape`` whose
    output has the input's shape, ``add(x, 0)``.

Readers of an identity read its input instead; the manager's sweep then drops the
dead node.
"""

from __future__ import annotations

from ..ir import Ref
from ..rewrite import Rewriter
from .manager import Match, register_pass

_ASSERTS = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
            "aten.sym_constrain_range_for_size.default"}
_ALWAYS_IDENTITY = {"aten.alias.default", "aten.detach.default", "aten.clone.default", "aten.dropout.default",
                    "aten.lift_fresh_copy.default"}
_SAME_SHAPE_IDENTITY = {"aten.slice.Tensor", "aten.expand.default", "aten.view.default", "aten.reshape.default",
                        "aten._unsafe_view.default"}
_CASTS = {"aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.type_as.default"}


def _identity_input(rw: Rewriter, n) -> Ref | None:
    src = n.args[0] if n.args and isinstance(n.args[0], Ref) else None
    if src is None or n.out is None:
        return None
    spec = rw.spec(src)
    if spec is None:
        return None
    same = spec.shape == n.out.shape and spec.dtype == n.out.dtype
    if n.op in _ALWAYS_IDENTITY:
        return src if same else None
    if n.op == "aten.contiguous.default":
        return src if same and spec.contiguous else None
    if n.op in _SAME_SHAPE_IDENTITY or n.op in _CASTS:
        return src if same else None
    if n.op == "aten.add.Tensor" and len(n.args) == 2 and n.args[1] == 0 and not n.kwargs:
        return src if same else None
    return None


@register_pass("eliminate_noops", "remove assertions and identity ops (same-dtype casts, full slices, ...)")
def eliminate_noops(rw: Rewriter) -> list[Match]:
    matches = []
    for n in list(rw.graph.nodes):
        if n.op in _ASSERTS:
            matches.append(Match(n.op.split(".")[1], n.layer, [n.name], []))
            continue
        src = _identity_input(rw, n)
        if src is not None:
            rw.replace_uses(n.name, src)
            matches.append(Match(n.op.split(".")[1], n.layer, [n.name], []))
    return matches
