"""Plotly figures of calibration statistics: is the calibration set large enough, and where do the thresholds cut.

    amax_convergence_figure(stats)              # each group's input amax after each calibration batch
    histogram_figure(stats, "layers.3.down")    # |x| of one group's input, with the fp8 / int8 thresholds

Both read a ``CalibrationStats`` (``calibrate.py``) and return a figure; plotly is imported inside each
function so the library imports without it.

The x axis of the convergence plot counts observer updates, the observers' ``samples``: one per
calibration step, which runs ``batch`` sequences (``calibrate``'s argument, not kept in the statistics),
so the last point is all ``stats.samples`` sequences. A line still rising at its right end says more
calibration data would move that threshold.
"""

from __future__ import annotations

from ..errors import WorkbenchError
from .observers import FORMATS as THRESHOLD_FORMATS

#: line colour per threshold format
_THRESHOLD_COLOURS = {"fp8": "#d62728", "int8": "#1f77b4"}


def _known_group(stats, group: str) -> None:
    if group not in stats.activations:
        known = list(stats.activations)
        raise WorkbenchError(f"no calibration statistics for group {group!r}; these statistics cover {len(known)} "
                             f"groups: {', '.join(known[:6])}{' ...' if len(known) > 6 else ''}")


def amax_convergence_figure(stats, groups: list[str] | None = None, *, relative: bool = False):
    """One line per group (default: all): its input's running amax after each observer update.

    ``relative`` divides each line by its final amax, so every line ends at 1 and groups of very
    different ranges share one axis."""
    import plotly.graph_objects as go

    groups = list(stats.activations) if groups is None else list(groups)
    for g in groups:
        _known_group(stats, g)
    fig = go.Figure()
    for g in groups:
        history = stats.activations[g].history
        y = [v / history[-1] if relative and history[-1] else v for v in history]
        fig.add_trace(go.Scatter(x=list(range(1, len(history) + 1)), y=y, mode="lines+markers", name=g,
                                 hovertemplate=f"{g}<br>after %{{x}} updates: %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title=f"Activation amax as calibration proceeds ({stats.samples} sequences x {stats.seq_len} "
                            f"tokens, '{stats.observer}' observer): flat lines mean enough samples",
                      xaxis_title="observer samples seen (calibration batches)",
                      yaxis_title="amax / final amax" if relative else "running amax of |x|",
                      legend_title="group")
    return fig


def histogram_figure(stats, group: str):
    """The distribution behind a group's activation thresholds, with the fp8 and int8 thresholds as lines.

    Histogram observers (percentile, mse, entropy) keep a histogram of |x|: it is shown as it is. The
    "max" observer keeps none, so the per-channel amax of the input (what SmoothQuant reads) is
    shown instead, and the title says so."""
    import plotly.graph_objects as go

    _known_group(stats, group)
    obs = stats.activations[group]
    fig = go.Figure()
    if hasattr(obs, "counts"):
        counts = obs.counts().cpu()
        width = obs.bin_width
        last = int(counts.nonzero().max()) + 1 if counts.any() else 1  # drop the empty tail of the range
        centres = [(i + 0.5) * width for i in range(last)]
        fig.add_trace(go.Bar(x=centres, y=counts[:last].tolist(), width=width, name="|x|", marker_line_width=0,
                             hovertemplate="|x| ≈ %{x:.4g}: %{y} values<extra></extra>"))
        title = f"{group}: histogram of |x| ({obs.rows} rows, '{stats.observer}' observer)"
        xaxis = "|x|"
    else:
        amax = stats.channels[group].amax().cpu()
        fig.add_trace(go.Histogram(x=amax.tolist(), nbinsx=min(100, max(10, amax.numel() // 4)), name="channels",
                                   hovertemplate="amax %{x}: %{y} channels<extra></extra>"))
        title = (f"{group}: per-channel amax of x over {amax.numel()} channels (the 'max' observer keeps no "
                 "histogram of |x|; calibrate with observer='percentile', 'mse' or 'entropy' for one)")
        xaxis = "max |x_j| per input channel j"
    for fmt in THRESHOLD_FORMATS:
        t = float(obs.threshold(fmt))
        fig.add_vline(x=t, line_color=_THRESHOLD_COLOURS[fmt], line_dash="dash", name=f"{fmt} threshold",
                      annotation_text=f"{fmt} {t:.4g}", annotation_position="top" if fmt == "fp8" else "bottom")
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title="count", yaxis_type="log", bargap=0,
                      showlegend=False)
    return fig
