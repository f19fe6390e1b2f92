"""Plotly figures of divergences: where along the model the error between two sides grows.

    divergence_figure(d)                                      # d's relative error per layer, log y
    divergence_figure(a, b, labels=["passes vs hf", "quant vs passes"])   # one line per comparison
    steps_figure(diff(ws, steps=4))                           # one line per step: the prefill, each decode step
    engines_figure(c)                                         # compare_engines: latency bars over error lines
    contributions_figure(c)                                   # group_contributions: error per group, sensitivity

Each line is one ``Divergence``'s layer rows (embed, 0, 1, ..., norm, logits) in depth order, on a shared
categorical x axis; each comparison's tolerance is a dashed line of its colour. A log axis cannot draw 0 (an
exact match, which a float32 graph against transformers often is), so errors below ``FLOOR`` are drawn at it and
the hover says the value was 0. plotly is imported inside the function so the library imports without it.
"""

from __future__ import annotations

from ..errors import WorkbenchError

#: Relative errors are drawn at least this high (log axis); the hover shows the real value.
FLOOR = 1e-10

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def depth_label(layer) -> str:
    """A layer row's x label: "embed", "0", "1", ..., "norm", "logits"."""
    return str(layer)


def divergence_figure(*divergences, labels=None, title: str = "Relative error against depth"):
    """One line per divergence: its layer rows' relative error against depth (layer on x, log y), with its
    tolerance dashed. ``labels``: one per divergence (default: "subject vs reference")."""
    import plotly.graph_objects as go

    if not divergences:
        raise WorkbenchError("divergence_figure needs at least one divergence")
    labels = list(labels) if labels is not None else [f"{d.subject} vs {d.reference}" for d in divergences]
    if len(labels) != len(divergences):
        raise WorkbenchError(f"{len(divergences)} divergences but {len(labels)} labels")
    order: list[str] = []  # the x categories in depth order, the deepest model's layers included
    for d in divergences:
        for layer in d.layers.layer:
            if depth_label(layer) not in order:
                order.append(depth_label(layer))
    order.sort(key=lambda s: (-1, 0) if s == "embed" else (1, 0) if s == "norm" else (2, 0) if s == "logits"
               else (0, int(s)))
    fig = go.Figure()
    for i, (d, label) in enumerate(zip(divergences, labels)):
        colour, rows = _COLOURS[i % len(_COLOURS)], d.layers
        y = [max(float(e), FLOOR) if e == e else None for e in rows.rel_err]  # NaN: a gap
        hover = [f"{label}<br>layer {r.layer} ({r.node}, {r.op})<br>rel err "
                 f"{'0 (drawn at %.0e)' % FLOOR if r.rel_err < FLOOR else f'{r.rel_err:.3e}'}"
                 f"<br>cosine {r.cosine:.6f}" for r in rows.itertuples()]
        fig.add_scatter(x=[depth_label(v) for v in rows.layer], y=y, mode="lines+markers", name=label,
                        line=dict(color=colour), hovertext=hover, hoverinfo="text")
        fig.add_scatter(x=[order[0], order[-1]], y=[d.tol, d.tol], mode="lines", showlegend=False,
                        line=dict(color=colour, dash="dash", width=1), hoverinfo="text",
                        hovertext=f"{label}: tolerance {d.tol:.0e}")
        if d.first is not None:
            fig.add_scatter(x=[depth_label(d.first.layer)], y=[max(d.first.rel_err, FLOOR)], mode="markers",
                            marker=dict(symbol="x", size=12, color=colour), showlegend=False, hoverinfo="text",
                            hovertext=d.first.line())
    fig.update_layout(title=title, xaxis=dict(title="layer", type="category", categoryorder="array",
                                              categoryarray=order),
                      yaxis=dict(title="relative error ‖a − b‖ / ‖b‖", type="log", exponentformat="power"),
                      height=380, legend=dict(orientation="h", y=-0.25), margin=dict(t=50))
    return fig


def step_labels(divergence) -> list[str]:
    """Each step's name: "prefill", then "decode k (token t)" for the token decode step k fed."""
    return ["prefill"] + [f"decode {k} (token {t})" for k, t in enumerate(divergence.tokens, 1)]


def steps_figure(divergence, *, title: str = "Relative error against depth, by step"):
    """A diff with decode steps (``diff(..., steps=N)``) as one line per step: the prompt's prefill, then each
    decode step through the KV cache (an error that only decoding makes starts at its step's line)."""
    return divergence_figure(*divergence.steps, labels=step_labels(divergence), title=title)


def engines_figure(comparison, *, title: str | None = None):
    """An ``EngineComparison`` (``debug.engines``) as two aligned panels over its rows (other, embed, 0, 1, ...,
    norm, logits): each side's latency as bars on top, each side's relative error against the reference as a line
    below (log y, drawn at least at ``FLOOR``); the hovers give each row's precision, speed-up and accuracy cost."""
    from plotly.subplots import make_subplots

    t = comparison.table
    x = [depth_label(v) for v in t.layer]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=(f"latency ({comparison.latency_source})",
                                        f"relative error against {comparison.reference}"))
    for side, name, colour in (("a", f"A: {comparison.a}", _COLOURS[0]), ("b", f"B: {comparison.b}", _COLOURS[1])):
        hover = [f"{name}<br>{r.layer}: {getattr(r, side + '_precision')}<br>{getattr(r, side + '_us'):.1f} µs"
                 f"<br>speed-up (B/A) {r.speedup:.2f}x<br>rel err {getattr(r, side + '_rel_err'):.2e}"
                 f"<br>accuracy cost (A − B) {r.err_cost:+.2e}" for r in t.itertuples()]
        fig.add_bar(x=x, y=getattr(t, side + "_us"), name=name, marker_color=colour, hovertext=hover,
                    hoverinfo="text", legendgroup=side, row=1, col=1)
        err = [max(float(e), FLOOR) if e == e else None for e in getattr(t, side + "_rel_err")]  # NaN: no site
        fig.add_scatter(x=x, y=err, mode="lines+markers", name=name, line=dict(color=colour), hovertext=hover,
                        hoverinfo="text", legendgroup=side, showlegend=False, row=2, col=1)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=x)
    fig.update_xaxes(title="layer", row=2, col=1)
    fig.update_yaxes(title="µs", row=1, col=1)
    fig.update_yaxes(title="‖a − ref‖ / ‖ref‖", type="log", exponentformat="power", row=2, col=1)
    fig.update_layout(title=title or f"{comparison.a} against {comparison.b}: {comparison.line()}",
                      barmode="group", height=520, legend=dict(orientation="h", y=-0.15), margin=dict(t=80),
                      title_font_size=12)
    return fig


def contributions_figure(contributions, *, top: int | None = 30, title: str | None = None):
    """``group_contributions`` (``debug.contributions``) as bars: each group's logits relative error when it alone is
    quantized, largest first (the ``top`` largest; None: all), the whole plan's error dashed across, and the
    group's sensitivity (perplexity change in %, right axis) as diamonds beside each bar where the stage measured
    it. The hovers give the group's format, share and first divergence."""
    from plotly.subplots import make_subplots

    t = contributions.table if top is None else contributions.table.head(top)
    x = list(t.group)
    hover = [f"{r.group} ({r.format})<br>logits rel err {r.rel_err:.2e} alone<br>share {r.share:.0%} of the whole "
             f"plan's (in squares)<br>largest layer rel err {r.max_rel_err:.2e}<br>first divergence: "
             f"{'none' if r.first is None else r.first}<br>sensitivity "
             f"{'not measured' if r.ppl_delta_pct != r.ppl_delta_pct else f'{r.ppl_delta_pct:+.2f}% perplexity'}"
             for r in t.itertuples()]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=x, y=t.rel_err, name="logits rel err, this group alone", marker_color=_COLOURS[0],
                hovertext=hover, hoverinfo="text")
    total = contributions.total_rel_err
    if x:
        fig.add_scatter(x=[x[0], x[-1]], y=[total, total], mode="lines", name=f"whole plan {total:.2e}",
                        line=dict(color=_COLOURS[1], dash="dash", width=1), hoverinfo="text",
                        hovertext=f"the whole plan: logits rel err {total:.2e}")
    if t.ppl_delta_pct.notna().any():
        fig.add_scatter(x=x, y=t.ppl_delta_pct, mode="markers", name="sensitivity (ppl change %)",
                        marker=dict(symbol="diamond", size=9, color=_COLOURS[3]), hovertext=hover,
                        hoverinfo="text", secondary_y=True)
        fig.update_yaxes(title="perplexity change, %", secondary_y=True, showgrid=False)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=x, title="group")
    fig.update_yaxes(title="‖quant − passes‖ / ‖passes‖ (logits)", secondary_y=False)
    fig.update_layout(title=title or contributions.line(), height=420, legend=dict(orientation="h", y=-0.35),
                      margin=dict(t=60), title_font_size=12)
    return fig
