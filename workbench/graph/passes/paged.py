"""Paged attention insertion: the fused attention reads and writes a paged KV cache.

After this pass the graph takes a flat batch (batch dim 1) of new tokens from any
number of sequences plus attention metadata (see ``workbench/graph/paged.py``
for the inputs), writes each layer's new K/V into its cache, and attends over each
sequence's whole context. The same graph serves prefill (many new tokens per
sequence), decode (one) and a mix of both in one step. The packed-sequence mask
that the captured graph built from positions is no longer read, and the sweep
drops it.
"""

from __future__ import annotations

from ..ir import Node, Ref, TensorSpec
from ..paged import RERUN_PASSES, PagedLayout, cache_input, is_paged
from ..rewrite import Rewriter
from .manager import Match, register_pass

#: Tokens per KV block unless the graph's meta says otherwise (``meta["kv_block_size"]``).
DEFAULT_BLOCK_SIZE = 16

METADATA = {
    "slot_mapping": TensorSpec(["tokens"], "int64"),
    "block_tables": TensorSpec(["seqs", "max_blocks"], "int64"),
    "seq_lens": TensorSpec(["seqs"], "int64"),
    "query_start_loc": TensorSpec(["seqs + 1"], "int64"),
}


def sliding_window(config: dict, layer: int) -> int | None:
    """The layer's attention window as transformers applies it (``layer_types`` where the config has them)."""
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if types is not None:
        return window if layer < len(types) and types[layer] == "sliding_attention" else None
    return window


@register_pass("insert_paged_attention", "attention -> workbench.paged_attention over a paged KV cache")
def insert_paged_attention(rw: Rewriter) -> list[Match]:
    g = rw.graph
    attention = [n for n in g.nodes if n.op == "workbench.attention"]
    if not attention:
        return []
    block_size = int(g.meta.get("kv_block_size", DEFAULT_BLOCK_SIZE))
    g.inputs.update(METADATA)
    matches, layers = [], []
    for n in attention:
        q, k, v, _mask, scale = n.args
        k_spec = rw.spec(k)
        kv_heads, head_dim = k_spec.shape[1], k_spec.shape[3]
        cache = cache_input(n.layer)
        g.inputs[cache] = TensorSpec([2, "num_blocks", block_size, kv_heads, head_dim], k_spec.dtype)
        window = sliding_window(g.meta.get("config", {}), n.layer)
        # the attention's soft cap (Gemma 2) goes with it, by name like the later passes' additions
        kwargs = {"softcap": n.kwargs["softcap"]} if n.kwargs.get("softcap") is not None else {}
        fused = rw.insert_before(n, Node(rw.fresh("paged_attention"), "workbench.paged_attention",
                                         [q, k, v, Ref(cache), *(Ref(m) for m in METADATA), scale, window], kwargs,
                                         [n.out], n.module, n.layer))
        rw.replace_uses(n.name, Ref(fused.name))
        matches.append(Match("paged_attention", n.layer, [n.name], [fused.name]))
        layers.append(n.layer)
    g.dims["batch"] = {"min": 1, "max": 1}
    g.dims.update({"seqs": {"min": 1, "max": 4096}, "max_blocks": {"min": 1, "max": 1 << 16},
                   "num_blocks": {"min": 1, "max": 1 << 24}})
    PagedLayout(block_size=block_size, layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                dtype=k_spec.dtype).store(g)
    return matches


def runtime_gap(graph, names: list[str]) -> str | None:
    """Why the runtime cannot run ``graph``, the result of passes ``names`` (one line; None: it can). A later
    stage that needs the KV cache (quantizing it, the runtime, an engine) fails on such a graph, so the passes
    stage warns when it saves one."""
    if is_paged(graph):
        return None
    if "insert_paged_attention" not in names:
        cause = "insert_paged_attention did not run"
    elif "fuse_attention" not in names:
        cause = "insert_paged_attention matched nothing, since it needs fuse_attention, which did not run"
    else:
        cause = "insert_paged_attention matched nothing"
    return f"the runtime cannot run this graph (no paged attention): {cause}; {RERUN_PASSES}"


def _is_one(rw: Rewriter, dim) -> bool:
    """A dim that is 1: the literal, or a named dim pinned to 1 (``batch`` in a paged graph)."""
    if isinstance(dim, str):
        r = rw.graph.dims.get(dim, {})
        return r.get("min") == r.get("max") == 1
    return dim == 1


@register_pass("fuse_rope_into_attention",
               "rope(q), rope(k) -> workbench.paged_attention(q, k, ..., cos=, sin=): RoPE inside the attention")
def fuse_rope_into_attention(rw: Rewriter) -> list[Match]:
    """The rotary embedding of q and k moves into the paged attention that reads them: its kernel rotates q
    as it loads it and k as it writes the cache, and the two rope kernels per layer are gone (at batch 1 a
    layer's launches are most of its cost). Matches where both ropes use the same cos/sin
    ([1, 1, tokens, head_dim]: one row per token), keep their input's dtype, and are read by nothing else."""
    matches = []
    for n in rw.graph.nodes:
        if n.op != "workbench.paged_attention" or "cos" in n.kwargs:
            continue
        rq, rk = rw.only_reader(n.args[0], n), rw.only_reader(n.args[1], n)
        if not (rq is not None and rk is not None and rq.op == rk.op == "workbench.rope" and rq is not rk):
            continue
        if rq.args[1:] != rk.args[1:]:
            continue
        cos = rw.spec(rq.args[1])
        if cos is None or len(cos.shape) != 4 or not all(_is_one(rw, d) for d in cos.shape[:2]):
            continue
        if any(rw.spec(r.args[0]) is None or r.out is None or rw.spec(r.args[0]).dtype != r.out.dtype
               for r in (rq, rk)):
            continue
        n.args = [rq.args[0], rk.args[0], *n.args[2:]]
        n.kwargs = {**n.kwargs, "cos": rq.args[1], "sin": rq.args[2]}
        matches.append(Match("rope into paged_attention", n.layer, [rq.name, rk.name, n.name], [n.name]))
    if matches:
        rw.refresh()
    return matches


def _head_norm(rw: Rewriter, v, reader):
    """(transpose or None, rms_norm) if ``v`` is [transpose(]rms_norm(x)[)] read only by ``reader``, its weight one
    head_dim vector in x's dtype or fp32 (Gemma 3's derived 1 + w) and its output in x's dtype (so the attention can
    round as the op does)."""
    t = rw.only_reader(v, reader)
    if t is not None and t.op == "aten.transpose.int":
        norm = rw.only_reader(t.args[0], t)
    else:
        t, norm = None, t
    if norm is None or norm.op != "workbench.rms_norm":
        return None
    x, w = rw.spec(norm.args[0]), rw.spec(norm.args[1])
    if x is None or w is None or norm.out is None or len(w.shape) != 1 or w.shape[0] != x.shape[-1]:
        return None
    if not (x.dtype == norm.out.dtype and w.dtype in (x.dtype, "float32")):
        return None
    return t, norm


@register_pass("fuse_qk_norm_into_attention",
               "rms_norm(q), rms_norm(k) per head -> workbench.paged_attention(..., q_norm=, k_norm=): Qwen3's "
               "and Gemma 3's q/k norms inside the attention")
def fuse_qk_norm_into_attention(rw: Rewriter) -> list[Match]:
    """Qwen3's per-head RMSNorms of q and k move into the paged attention that reads them (after their RoPE moved
    there): its kernel norms q as it loads it, and the cache write norms k before rotating and storing it; two
    norm launches per layer fewer. Matches where both norms share eps, norm over head_dim in the input dtype,
    and are read by nothing else (through the transpose to [batch, heads, tokens, head_dim])."""
    matches = []
    for n in rw.graph.nodes:
        if n.op != "workbench.paged_attention" or "q_norm" in n.kwargs:
            continue
        found = [_head_norm(rw, n.args[i], n) for i in (0, 1)]
        if None in found or found[0][1] is found[1][1] or found[0][1].args[2] != found[1][1].args[2]:
            continue
        args = list(n.args)
        for i, (t, norm) in enumerate(found):
            if t is not None:  # the transpose now reads the norm's input
                t.args = [norm.args[0], *t.args[1:]]
            else:
                args[i] = norm.args[0]
        n.args = args
        (_, qn), (_, kn) = found
        n.kwargs = {**n.kwargs, "q_norm": qn.args[1], "k_norm": kn.args[1], "norm_eps": qn.args[2]}
        matches.append(Match("q/k norm into paged_attention", n.layer, [qn.name, kn.name, n.name], [n.name]))
    if matches:
        rw.refresh()
    return matches
