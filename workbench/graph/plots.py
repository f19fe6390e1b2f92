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
