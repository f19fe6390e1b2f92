"""Views of timings: plotly figures from ``TimingCache.table()`` and trace DataFrames (plotly imported
inside each: the GPU machine has none).

    tactic_comparison_figure(table)      every candidate of every op instance, best marked
    op_share_figure(table)               each op type's share of the tuned time (sum of the chosen timings)
    config_shape_heatmap(table, op)      one op: candidates x instances, cell = ms, gaps where it failed
    top_slowest_figure(df, n)            the n slowest instances (timing table) or nodes/ops (trace summary)
    roofline_rows(table)                 chosen timings with cost-model FLOPs and bytes (a DataFrame)
    roofline_figure(rows, ceilings)      achieved TFLOP/s against intensity, under the measured ceilings
"""

from __future__ import annotations

#: a legend of many entries laid out below the figure: at the side, JupyterLab showed it in a scroll box
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.25, font_size=9)


def _short(key: str) -> str:
    """'workbench.rope [[[1, 32, 2048, 128], ...' -> 'rope 1x32x2048x128'"""
    from ..kernels.autotune import read_key

    op, args, _kwargs = read_key(key)
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
                      yaxis_title="ms (median)", xaxis_tickangle=-30, legend=LEGEND_BELOW)
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


def _unique(labels) -> list[str]:
    """Labels made unique (plotly merges equal categories): repeats get ' (2)', ' (3)', ..."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _candidate(tactic: str, config: str) -> str:
    return tactic if config == "null" else f"{tactic} {config}"


def config_shape_heatmap(table, op: str, *, relative: bool = False):
    """Every candidate (rows: tactic + config) of one op at every instance it was tuned for (columns).

    Cells are the median ms (``relative``: ms over the instance's best, so 1.0 is the winner);
    candidates that failed (inf) or were not timed there are gaps. The chosen cell is marked."""
    import math

    import plotly.graph_objects as go

    ops = set(table["op"])
    name = op if op in ops else f"workbench.{op}"
    if name not in ops:
        from ..errors import WorkbenchError

        raise WorkbenchError(f"op {op!r} is not in this timing table; it has: {', '.join(sorted(ops))}")
    t = table[table["op"] == name]
    keys = list(dict.fromkeys(t["key"]))
    columns = dict(zip(keys, _unique(_short(k) for k in keys)))
    candidates = list(dict.fromkeys(_candidate(tc, c) for tc, c in zip(t["tactic"], t["config"])))
    z = [[None] * len(keys) for _ in candidates]
    row_of, col_of = {c: i for i, c in enumerate(candidates)}, {k: j for j, k in enumerate(keys)}
    chosen_x, chosen_y = [], []
    for r in t.itertuples(index=False):
        cand = _candidate(r.tactic, r.config)
        if math.isfinite(r.ms):
            z[row_of[cand]][col_of[r.key]] = float(r.ms)
        if r.chosen:
            chosen_x.append(columns[r.key])
            chosen_y.append(cand)
    if relative:
        for j in range(len(keys)):
            best = min((row[j] for row in z if row[j] is not None), default=None)
            for row in z:
                if row[j] is not None:
                    row[j] = row[j] / best
    fig = go.Figure(go.Heatmap(z=z, x=list(columns.values()), y=candidates, hoverongaps=False,
                               colorscale="Viridis_r", texttemplate="%{z:.3g}",
                               colorbar=dict(title="× best" if relative else "ms"),
                               hovertemplate="%{y}<br>%{x}<br>%{z:.4g}" + (" × best" if relative else " ms")
                                             + "<extra></extra>"))
    fig.add_trace(go.Scatter(x=chosen_x, y=chosen_y, mode="markers", name="chosen", hoverinfo="skip",
                             marker=dict(symbol="square-open", size=22, color="red", line_width=3)))
    fig.update_layout(title=f"{name.removeprefix('workbench.')}: every config at every shape"
                            f" ({'relative to the best' if relative else 'ms'}; gaps failed or not timed)",
                      xaxis_title="op instance", yaxis_title="candidate", xaxis_tickangle=-30)
    return fig


def top_slowest_figure(df, n: int = 20):
    """The ``n`` slowest items, slowest on top, in ms.

    ``df`` is a ``TimingCache.table()`` (each instance's chosen candidate) or a trace summary
    (``profiling.trace.trace_summary``: one bar per node, op or kernel name, its total time)."""
    import plotly.graph_objects as go

    if {"key", "chosen", "ms"} <= set(df.columns):
        t = df[df["chosen"]]
        labels = [f"{_short(k)} · {tc}" for k, tc in zip(t["key"], t["tactic"])]
        values, what = t["ms"].astype(float), "chosen candidate per op instance"
    elif "total_us" in df.columns:
        by = next(c for c in ("node", "op", "name") if c in df.columns)
        t = df
        labels = [str(x) for x in t[by]]
        values, what = t["total_us"].astype(float) / 1e3, f"traced time per {by}"
    else:
        from ..errors import WorkbenchError

        raise WorkbenchError("top_slowest_figure takes a TimingCache.table() or a trace_summary() DataFrame")
    total = float(values.sum())
    order = values.reset_index(drop=True).sort_values(ascending=False, kind="stable").index[:n]
    labels = _unique(labels)
    ys = [labels[i] for i in order]
    xs = [float(values.iloc[i]) for i in order]
    share = [100 * x / total if total else 0.0 for x in xs]
    fig = go.Figure(go.Bar(x=xs, y=ys, orientation="h", customdata=share,
                           hovertemplate="%{y}: %{x:.4g} ms (%{customdata:.1f}% of all)<extra></extra>"))
    fig.update_layout(title=f"Top {len(xs)} of {len(values)}: {what}", xaxis_title="ms",
                      yaxis=dict(autorange="reversed"), margin_l=220)
    return fig


def _dtype(name):
    """The torch dtype a name denotes ('bfloat16', or a repr 'torch.bfloat16'), else None."""
    from ..errors import WorkbenchError
    from ..graph.ir import dtype_from_name

    try:
        return dtype_from_name(name)
    except WorkbenchError:
        return None


def _decode(v, tensor):
    """A described argument (``autotune.instance_key``) back to a value: [shape, dtype name] through
    ``tensor(shape, dtype name)``, dtypes (described by their repr) back to dtypes, devices to meta."""
    import torch

    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], list) and all(isinstance(d, int) for d in v[0]) \
            and isinstance(v[1], str) and not v[1].startswith("torch.") and _dtype(v[1]) is not None:
        return tensor(v[0], v[1])
    if isinstance(v, list):
        return [_decode(x, tensor) for x in v]
    if isinstance(v, str) and v.startswith("torch.") and _dtype(v) is not None:
        return _dtype(v)
    if isinstance(v, str) and v.startswith("device("):
        return torch.device("meta")
    return v


def key_cost(key: str, registry=None) -> tuple[int, int]:
    """(FLOPs, bytes) of the op call a timing-cache key describes, from the registry's cost model.

    Output specs come from running the op's reference on meta tensors (no data, no time); an op
    whose reference needs data (``.tolist()``, as paged attention's loop does) raises."""
    import torch

    from ..graph.ir import TensorSpec, dtype_from_name, dtype_name
    from ..kernels.autotune import read_key
    from ..kernels.cost import OpCall
    from ..kernels.registry import REGISTRY

    def meta(shape, dtype):
        return torch.empty(shape, dtype=dtype_from_name(dtype), device="meta")

    def spec(shape, dtype):
        return TensorSpec(list(shape), dtype)  # the key does not say; a timed argument is usually contiguous

    op, args, kwargs = read_key(key)
    opdef = (registry or REGISTRY).get(op)
    out = opdef.reference(*_decode(args, meta), **{k: _decode(v, meta) for k, v in kwargs.items()})
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    outputs = [TensorSpec(list(o.shape), dtype_name(o.dtype), o.is_contiguous()) if isinstance(o, torch.Tensor)
               else None for o in outs]
    cost = opdef.cost(OpCall(_decode(args, spec), {k: _decode(v, spec) for k, v in kwargs.items()}, outputs, {}))
    return cost.flops, cost.bytes


def _achieved(rows):
    """Arithmetic intensity (FLOP/byte), achieved TFLOP/s and GB/s beside ``rows``' flops, bytes, ms."""
    s = rows["ms"].astype(float) * 1e-3
    return rows.assign(intensity=rows["flops"] / rows["bytes"], tflops=rows["flops"] / s / 1e12,
                       gbps=rows["bytes"] / s / 1e9)


def roofline_rows(table):
    """Each op instance's chosen candidate with its cost-model FLOPs and bytes (NaN, with a note,
    where the op cannot be costed from its key), intensity and achieved TFLOP/s and GB/s."""
    import math

    import pandas as pd

    best = table[table["chosen"]]
    rows = []
    for r in best.itertuples(index=False):
        try:
            flops, nbytes, note = *key_cost(r.key), ""
        except Exception as e:  # the reference needs real data, or the key holds an undecodable value
            flops, nbytes, note = math.nan, math.nan, f"not costed: {type(e).__name__}: {e}"[:200]
        rows.append({"name": _short(r.key), "op": r.op, "key": r.key, "tactic": r.tactic, "config": r.config,
                     "ms": r.ms, "flops": flops, "bytes": nbytes, "note": note})
    df = pd.DataFrame(rows, columns=["name", "op", "key", "tactic", "config", "ms", "flops", "bytes", "note"])
    df["name"] = _unique(df["name"])
    return _achieved(df.astype({"flops": "float64", "bytes": "float64", "ms": "float64"}))


def roofline_figure(rows, ceilings):
    """Log-log roofline: each row at (FLOP/byte, achieved TFLOP/s) under the measured ceilings.

    ``rows`` needs name (or op), op, flops, bytes, ms (``roofline_rows``, or a graph's node table
    joined with a trace summary); ``ceilings`` = {"copy_gbps": ..., "matmul_tflops": ...} (see
    ``profiling.ceilings``). The memory ceiling is the line TFLOP/s = intensity · GB/s / 1000 up to
    the ridge point, the compute roof is flat after it. Rows without FLOPs, bytes or a finite time
    cannot sit on log axes: they are left out and counted in a note."""
    import math

    import plotly.graph_objects as go

    gbps, tflops = float(ceilings["copy_gbps"]), float(ceilings["matmul_tflops"])
    ridge = tflops * 1e3 / gbps  # FLOP/byte where the two ceilings meet
    df = _achieved(rows)
    label = df["name"] if "name" in df.columns else df["op"]
    ok = ((df["flops"] > 0) & (df["bytes"] > 0) & (df["ms"] > 0)).fillna(False) & df["ms"].map(math.isfinite)
    shown, left_out = df[ok].assign(label=label[ok]), label[~ok]
    fig = go.Figure()
    for op, g in shown.groupby("op", sort=False):
        ceiling = g["intensity"].map(lambda x: min(tflops, x * gbps / 1e3))
        fig.add_trace(go.Scatter(
            x=g["intensity"], y=g["tflops"], mode="markers", name=str(op).removeprefix("workbench."),
            marker_size=10,
            customdata=list(zip(g["label"], g["ms"], g["gbps"], 100 * g["tflops"] / ceiling)),
            hovertemplate="%{customdata[0]}<br>%{customdata[1]:.4g} ms, %{x:.3g} FLOP/byte"
                          "<br>%{y:.3g} TFLOP/s, %{customdata[2]:.0f} GB/s"
                          "<br>%{customdata[3]:.1f}% of the ceiling here<extra></extra>"))
    lo = min([ridge, *shown["intensity"]]) / 4
    hi = max([ridge, *shown["intensity"]]) * 4
    fig.add_trace(go.Scatter(x=[lo, ridge], y=[lo * gbps / 1e3, tflops], mode="lines", name=f"memory {gbps:.0f} GB/s",
                             line=dict(color="black", dash="dash")))
    fig.add_trace(go.Scatter(x=[ridge, hi], y=[tflops, tflops], mode="lines", name=f"matmul {tflops:.0f} TFLOP/s",
                             line=dict(color="black")))
    title = f"Roofline: {len(shown)} rows under the measured ceilings"
    if len(left_out):
        # two names a line: a long list ran off the figure at JupyterLab's default width
        names = [str(n) for n in left_out[:4]] + (["..."] if len(left_out) > 4 else [])
        lines = "<br>".join(", ".join(names[i:i + 2]) for i in range(0, len(names), 2))
        title += f"<br><sup>left out ({len(left_out)}: no FLOPs, bytes or time, or not costed):<br>{lines}</sup>"
    fig.update_layout(title=title, xaxis_title="arithmetic intensity (FLOP/byte)", yaxis_title="achieved TFLOP/s",
                      legend=LEGEND_BELOW)
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig
