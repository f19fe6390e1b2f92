"""Paged attention insertion: the fused attention reads and writes a paged KV cache.

After this pass the graph takes a flat batch (batch dim 1) of new tokens from any
number of sequences plus attention metadata (see ``workbench/runtime/paged_cache.py``
for the inputs), writes each layer's new K/V into its cache, and attends over each
sequence's whole context. The same graph serves prefill (many new tokens per
sequence), decode (one) and a mix of both in one step. The packed-sequence mask
that the captured graph built from positions is no longer read, and the sweep
drops it.
"""

from __future__ import annotations

from ..ir import Node, Ref, TensorSpec
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
        cache = f"kv_cache_{n.layer}"
        g.inputs[cache] = TensorSpec([2, "num_blocks", block_size, kv_heads, head_dim], k_spec.dtype)
        window = sliding_window(g.meta.get("config", {}), n.layer)
        fused = rw.insert_before(n, Node(rw.fresh("paged_attention"), "workbench.paged_attention",
                                         [q, k, v, Ref(cache), *(Ref(m) for m in METADATA), scale, window], {},
                                         [n.out], n.module, n.layer))
        rw.replace_uses(n.name, Ref(fused.name))
        matches.append(Match("paged_attention", n.layer, [n.name], [fused.name]))
        layers.append(n.layer)
    g.dims["batch"] = {"min": 1, "max": 1}
    g.dims.update({"seqs": {"min": 1, "max": 4096}, "max_blocks": {"min": 1, "max": 1 << 16},
                   "num_blocks": {"min": 1, "max": 1 << 24}})
    g.meta["paged"] = {"block_size": block_size, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
                       "dtype": k_spec.dtype}
    return matches
