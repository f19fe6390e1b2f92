"""Tables of a graph: one row per node, op histogram, per-layer totals, summary.

All functions take a graph and concrete sizes (``batch``, ``tokens``) and return
pandas DataFrames or plain dicts; plots and widgets are built on these
elsewhere. Costs come from the op registry's cost models.
"""

from __future__ import annotations

from typing import Any

from ..kernels.cost import OpCall
from ..kernels.registry import REGISTRY, OpRegistry
from .ir import Graph, Ref


def _call(specs: dict, node, sizes: dict[str, int]) -> OpCall:
    def sub(v: Any) -> Any:
        if isinstance(v, Ref):
            return specs[v.name]
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    return OpCall(sub(node.args), {k: sub(v) for k, v in node.kwargs.items()}, node.outputs, sizes)


def node_table(graph: Graph, *, batch: int = 1, tokens: int = 128, registry: OpRegistry = REGISTRY):
    """One row per node: op, decoder layer, module, output shape and dtype, FLOPs, bytes."""
    import pandas as pd

    sizes = graph.bind(batch=batch, tokens=tokens)
    specs = graph.specs()
    rows = []
    for n in graph.nodes:
        cost = registry.get(n.op).cost(_call(specs, n, sizes))
        out = n.out
        rows.append({"name": n.name, "op": n.op, "layer": n.layer, "module": n.module,
                     "shape": list(out.concrete_shape(sizes)) if out else None, "dtype": out.dtype if out else None,
                     "flops": cost.flops, "bytes": cost.bytes, "inputs": list(n.refs())})
    df = pd.DataFrame(rows, columns=["name", "op", "layer", "module", "shape", "dtype", "flops", "bytes", "inputs"])
    df["layer"] = df["layer"].astype("Int64")
    return df


def op_histogram(graph: Graph, *, batch: int = 1, tokens: int = 128):
    """Ops by count, with their share of FLOPs and bytes."""
    df = node_table(graph, batch=batch, tokens=tokens)
    hist = df.groupby("op").agg(count=("name", "size"), flops=("flops", "sum"), bytes=("bytes", "sum"))
    return hist.sort_values(["count", "flops"], ascending=False).reset_index()


def layer_table(graph: Graph, *, batch: int = 1, tokens: int = 128):
    """Totals per decoder layer; nodes outside the layers (embedding, final norm, lm_head) grouped by module."""
    df = node_table(graph, batch=batch, tokens=tokens)
    group = df["layer"].astype("string").fillna(df["module"].str.split(".").str[-1].replace("", "(graph)"))
    out = df.assign(group=group).groupby("group", sort=False).agg(
        nodes=("name", "size"), flops=("flops", "sum"), bytes=("bytes", "sum"))
    return out.reset_index()


def summary(graph: Graph, *, tokens: tuple[int, ...] = (1, 512)) -> dict[str, Any]:
    """Counts and per-token costs at a few token counts (1 = one decode step, 512 = a prefill)."""
    weights, seen = [], set()
    for p in graph.params.values():  # tied tensors (lm_head = embed_tokens) count once
        if p.kind == "parameter" and p.name not in seen:
            weights.append(p)
            seen.update([p.name, *p.aliases])
    buffers = sum(p.kind != "parameter" for p in graph.params.values())
    sizes1 = {"batch": 1, "tokens": 1}
    costs = {}
    for t in tokens:
        df = node_table(graph, batch=1, tokens=t)
        costs[t] = {"flops_per_token": int(df["flops"].sum()) / t, "bytes_per_token": int(df["bytes"].sum()) / t}
    return {
        "architecture": graph.meta.get("architecture"),
        "dtype": graph.meta.get("dtype"),
        "nodes": len(graph.nodes),
        "distinct_ops": len({n.op for n in graph.nodes}),
        "layers": len({n.layer for n in graph.nodes if n.layer is not None}),
        "parameters": sum(p.spec.numel(sizes1) for p in weights),
        "parameter_bytes": sum(p.spec.nbytes(sizes1) for p in weights),
        "buffers": buffers,
        "per_token": costs,
    }


def format_summary(s: dict[str, Any], hist=None, top: int = 12) -> str:
    lines = [f"{s['architecture']} ({s['dtype']}): {s['nodes']} nodes, {s['distinct_ops']} distinct ops, "
             f"{s['layers']} decoder layers",
             f"parameters: {s['parameters'] / 1e6:,.1f} M ({s['parameter_bytes'] / 2**20:,.1f} MiB), "
             f"buffers/constants: {s['buffers']}"]
    for t, c in s["per_token"].items():
        intensity = c["flops_per_token"] / c["bytes_per_token"] if c["bytes_per_token"] else float("nan")
        lines.append(f"at {t:>4} tokens: {c['flops_per_token'] / 1e9:8.3f} GFLOP/token, "
                     f"{c['bytes_per_token'] / 2**20:10.2f} MiB/token moved, {intensity:7.1f} FLOP/byte")
    if hist is not None:
        lines.append("ops (count, share of FLOPs at the last size):")
        total = max(int(hist["flops"].sum()), 1)
        for _, r in hist.head(top).iterrows():
            lines.append(f"  {r['op']:<40} {r['count']:>5}  {100 * r['flops'] / total:5.1f}%")
        if len(hist) > top:
            lines.append(f"  ... and {len(hist) - top} more ops")
    return "\n".join(lines)
