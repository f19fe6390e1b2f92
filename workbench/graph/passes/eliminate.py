"""Node elimination: ops that do nothing in inference.

  * assertions (``_assert_tensor_metadata``, ``_assert_scalar``): no value, checked at capture;
  * identities: casts to the dtype a tensor already has, ``alias``, ``detach``, ``clone``
    (the graph is functional, nothing writes in place), ``contiguous`` of a contiguous
    tensor, ``dropout`` (inference), and ``slice``/``expand``/``view``/``reshape`` whose
    output has the input's shape, ``add(x, 0)``, and ``cat`` of one tensor with empty ones (Phi-3's
    ``cat([rotated, x[..., rotary_dim:]])`` when the rotary covers the whole head: the pass-through is empty).

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


def _cat_of_one(rw: Rewriter, n) -> Ref | None:
    """The one non-empty input of ``cat(tensors, dim)`` whose other inputs have a static size 0 along dim."""
    tensors, dim = n.args[0], (n.args[1] if len(n.args) > 1 else 0)
    if not isinstance(tensors, list) or not all(isinstance(t, Ref) for t in tensors) or not isinstance(dim, int):
        return None
    specs = [rw.spec(t) for t in tensors]
    if any(s is None for s in specs):
        return None
    kept = [t for t, s in zip(tensors, specs) if s.shape[dim] != 0]
    if len(kept) != 1:
        return None
    spec = rw.spec(kept[0])
    return kept[0] if spec.shape == n.out.shape and spec.dtype == n.out.dtype else None


def _identity_input(rw: Rewriter, n) -> Ref | None:
    if n.op == "aten.cat.default" and n.out is not None:
        return _cat_of_one(rw, n)
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
