"""Views of a timing cache: plotly figures from ``TimingCache.table()`` (plotly imported inside each).

    tactic_comparison_figure(table)   every candidate of every op instance, best marked
    op_share_figure(table)            each op type's share of the tuned time (sum of the chosen timings)
"""

from __future__ import annotations


def _short(key: str) -> str:
    """'workbench.rope [[[1, 32, 2048, 128], ...' -> 'rope 1x32x2048x128'"""
    import json

    op, args, _kwargs = json.loads(key)
    first = next((a for a in args if isinstance(a, list) and len(a) == 2 and isinstance(a[0], list)), None)
    shape = "x".join(map(str, first[0])) if first else ""
    return f"{op.removeprefix('workbench.')} {shape}"


def tactic_comparison_figure(table):
    """One group of bars per op instance: the reference and every tactic config, the chosen one outlined."""
    import plotly.graph_objects as go

    t = table[table["ms"] != float("inf")].copy()
    t["instance"] = t["key"].map(_short)
    t["candidate"] = t["tactic"] + " " + t["config"].where(t["config"] != "null", "")
    fig = go.Figure()
    for candidate, rows in t.groupby("candidate", sort=False):
        fig.add_trace(go.Bar(x=rows["instance"], y=rows["ms"], name=candidate,
                             marker_line_width=[3 if c else 0 for c in rows["chosen"]],
                             marker_line_color="black"))
    fig.update_layout(barmode="group", title="Every candidate per op instance (chosen outlined)",
                      yaxis_title="ms (median)", xaxis_tickangle=-30, legend_font_size=9)
    return fig


def op_share_figure(table):
    """Treemap of the tuned time: op types, then their instances, sized by the chosen candidate's time."""
    import plotly.graph_objects as go

    best = table[table["chosen"]].copy()
    best["instance"] = best["key"].map(_short)
    ops = best.groupby("op")["ms"].sum()
    ids = [*ops.index, *best["key"]]  # instance labels can repeat; their keys cannot
    labels = [*ops.index.str.removeprefix("workbench."), *best["instance"]]
    parents = [""] * len(ops) + list(best["op"])
    values = [*ops.values, *best["ms"]]
    fig = go.Figure(go.Treemap(ids=ids, labels=labels, parents=parents, values=values, branchvalues="total"))
    fig.update_layout(title="Share of tuned time by op")
    return fig
