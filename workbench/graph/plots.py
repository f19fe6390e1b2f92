"""Plotly figures of a graph's tables. Each takes a DataFrame from ``views`` and returns a figure.

plotly is imported inside each function: the core library must import without it
(the GPU machine has none).
"""

from __future__ import annotations


def op_histogram_figure(hist, *, top: int = 20):
    """Bar chart of node counts per op, coloured by share of FLOPs."""
    import plotly.graph_objects as go

    df = hist.head(top)
    total = max(int(hist["flops"].sum()), 1)
    fig = go.Figure(go.Bar(x=df["op"].str.removeprefix("aten."), y=df["count"],
                           marker=dict(color=100 * df["flops"] / total, colorscale="Viridis",
                                       colorbar=dict(title="% FLOPs")),
                           customdata=100 * df["flops"] / total,
                           hovertemplate="%{x}: %{y} nodes, %{customdata:.1f}% of FLOPs<extra></extra>"))
    fig.update_layout(title=f"Ops by count (top {len(df)} of {len(hist)})", xaxis_title="op",
                      yaxis_title="nodes", xaxis_tickangle=-45)
    return fig


def layer_cost_figure(layers):
    """FLOPs and bytes moved per decoder layer (and the embedding, final norm and lm_head)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=layers["group"], y=layers["flops"] / 1e9, name="GFLOP"), secondary_y=False)
    fig.add_trace(go.Scatter(x=layers["group"], y=layers["bytes"] / 2**20, name="MiB moved", mode="lines+markers"),
                  secondary_y=True)
    fig.update_layout(title="Cost per layer", xaxis_title="layer")
    fig.update_yaxes(title_text="GFLOP", secondary_y=False)
    fig.update_yaxes(title_text="MiB moved", secondary_y=True)
    return fig


def pass_waterfall_figure(table):
    """How node count and estimated memory traffic fall across passes (a ``summary_table``)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("nodes", "bytes moved (MiB, cost model)"))
    x = ["captured", *table["pass"], "optimized"]
    nodes = [int(table["nodes_before"].iloc[0]), *(table["nodes_after"] - table["nodes_before"]), 0]
    mib = [None, *(-table["bytes_saved"] / 2**20), 0]
    bytes_before = table.attrs.get("bytes_before_first")
    mib[0] = bytes_before / 2**20 if bytes_before is not None else 0.0
    measure = ["absolute", *["relative"] * len(table), "total"]
    fig.add_trace(go.Waterfall(x=x, y=nodes, measure=measure, name="nodes"), row=1, col=1)
    fig.add_trace(go.Waterfall(x=x, y=mib, measure=measure, name="MiB"), row=1, col=2)
    fig.update_layout(title="What each pass removed", showlegend=False)
    return fig


def pass_layer_figure(before, after, reports, layer: int = 0):
    """One decoder layer's ops before and after the passes, as boxes in execution order.

    Boxes of the optimized graph are coloured by the pass that created them; ops no
    pass touched are grey. Hover shows each node's name and op.
    """
    import plotly.graph_objects as go

    made_by = {name: r.name for r in reports if r.accepted for m in r.matches for name in m.created}
    passes = [r.name for r in reports if r.accepted]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    colour = {p: palette[i % len(palette)] for i, p in enumerate(passes)}
    fig = go.Figure()
    for row, (label, graph) in enumerate((("captured", before), ("optimized", after))):
        nodes = [n for n in graph.nodes if n.layer == layer]
        groups: dict[str, list] = {}
        for i, n in enumerate(nodes):
            key = made_by.get(n.name, "unchanged") if row == 1 else "captured"
            groups.setdefault(key, []).append((i, n))
        for key, items in groups.items():
            fig.add_trace(go.Scatter(
                x=[i for i, _ in items], y=[label] * len(items), mode="markers", name=f"{label}: {key}",
                marker=dict(symbol="square", size=14, color=colour.get(key, "#b0b0b0"), line=dict(width=1)),
                text=[f"{n.name}<br>{n.op}" for _, n in items], hoverinfo="text"))
    fig.update_layout(title=f"Decoder layer {layer}: {sum(n.layer == layer for n in before.nodes)} ops captured, "
                            f"{sum(n.layer == layer for n in after.nodes)} after the passes",
                      xaxis_title="execution order within the layer", yaxis=dict(categoryorder="array",
                      categoryarray=["optimized", "captured"]), height=320)
    return fig
