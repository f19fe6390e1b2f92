"""Plotly figures of the runtime: what each engine step ran, and how many requests a KV cache holds.

    timeline_figure(engine.timeline())               # tokens per step; KV usage, requests, preemptions
    timeline_figure(steps, max_num_batched_tokens=64)    # ... with the scheduler's token budget drawn
    request_table(outputs)                           # one row per request: tokens, cache hits, preemptions, TTFT
    capacity_figure(concurrency_table(layout, ...))  # max concurrency vs memory fraction, a line per shape

Each takes data (the engine's timeline DataFrame, ``RequestOutput``s, a ``concurrency_table``) and returns a
figure or a DataFrame; plotly is imported inside each function so the library imports without it.

Reading the timeline. The top panel stacks each step's prefill tokens (prompt chunks, including prompts
recomputed after a preemption) on its decode tokens (one per running request that generated): a step
with both is in-flight batching, a prompt spread over several steps is chunked prefill. On top, in grey,
the padding of the CUDA graph the step replayed (the graph's tokens beyond the step's: work done for
nothing; the title counts the steps that ran eagerly instead, node by node). The bottom panel
is the state after each step: the share of KV blocks in use (left axis), the running and waiting requests
(right axis), and a cross on the KV line at each step that preempted requests to free blocks.
"""

from __future__ import annotations

from ..errors import WorkbenchError

#: the timeline columns the figure reads (``LLMEngine.timeline`` writes these and more)
TIMELINE_COLUMNS = ("step", "prefill_tokens", "decode_tokens", "kv_usage", "running", "waiting", "preempted")
#: the ``concurrency_table`` columns the capacity figure reads
CAPACITY_COLUMNS = ("fraction", "prompt_len", "output_len", "num_blocks", "kv_gib", "max_concurrency")

_COLOURS = {"prefill": "#1f77b4", "decode": "#ff7f0e", "kv": "#2ca02c", "running": "#9467bd", "waiting": "#8c564b",
            "preempted": "#d62728", "padding": "#c7c7c7"}


def _require(df, columns, what: str, fix: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise WorkbenchError(f"{what} lacks the columns {', '.join(missing)}; {fix}")


def _ints(series) -> list[int]:
    return [int(v) for v in series]


def _tp_size(df) -> int:
    """The tensor-parallel size the timeline's steps ran at (1 for timelines written before it was recorded)."""
    return int(df["tensor_parallel_size"].max()) if "tensor_parallel_size" in df.columns else 1


def timeline_figure(timeline, *, max_num_batched_tokens: int | None = None):
    """Two panels sharing the step axis: stacked prefill/decode tokens per step above; KV-cache usage (%),
    running and waiting requests and preemptions below.

    ``timeline`` is ``LLMEngine.timeline()`` (or the same columns from a file). ``max_num_batched_tokens``
    draws the scheduler's token budget over the bars."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if timeline is None or len(timeline) == 0:
        raise WorkbenchError("the timeline is empty: run some steps first (engine.step() or LLM.generate), "
                             "then pass engine.timeline()")
    _require(timeline, TIMELINE_COLUMNS, "the timeline", "pass LLMEngine.timeline() as it is")
    df = timeline.sort_values("step")
    steps = _ints(df["step"])
    prefill, decode = _ints(df["prefill_tokens"]), _ints(df["decode_tokens"])
    kv_pct = [float(v) * 100 for v in df["kv_usage"]]
    preempted = _ints(df["preempted"])

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.55, 0.45],
                        specs=[[{}], [{"secondary_y": True}]],
                        subplot_titles=("", "after each step: KV cache and requests"))
    fig.add_trace(go.Bar(x=steps, y=prefill, name="prefill tokens", marker_color=_COLOURS["prefill"],
                         hovertemplate="step %{x}: %{y} prefill tokens<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=steps, y=decode, name="decode tokens", marker_color=_COLOURS["decode"],
                         hovertemplate="step %{x}: %{y} decode tokens<extra></extra>"), row=1, col=1)
    eager = 0
    if "graph_tokens" in df.columns:  # the CUDA graph each step replayed (0: run eagerly)
        graph = _ints(df["graph_tokens"])
        padding = [max(0, g - p - d) for g, p, d in zip(graph, prefill, decode)]
        eager = sum(g == 0 and p + d > 0 for g, p, d in zip(graph, prefill, decode))
        fig.add_trace(go.Bar(x=steps, y=padding, name="graph padding", marker_color=_COLOURS["padding"],
                             customdata=graph,
                             hovertemplate="step %{x}: %{y} padding tokens in its %{customdata}-token CUDA graph"
                                           "<extra></extra>"), row=1, col=1)
    if max_num_batched_tokens is not None:
        fig.add_hline(y=max_num_batched_tokens, line_dash="dash", line_color="#555", row=1, col=1,
                      annotation_text=f"token budget {max_num_batched_tokens}", annotation_position="top left")
    fig.add_trace(go.Scatter(x=steps, y=kv_pct, mode="lines", name="KV cache used (%)",
                             line=dict(color=_COLOURS["kv"], width=2),
                             hovertemplate="step %{x}: %{y:.1f}% of KV blocks in use<extra></extra>"),
                  row=2, col=1, secondary_y=False)
    hit = [i for i, n in enumerate(preempted) if n > 0]
    fig.add_trace(go.Scatter(x=[steps[i] for i in hit], y=[kv_pct[i] for i in hit], mode="markers",
                             name="preemption", marker=dict(symbol="x", size=11, color=_COLOURS["preempted"]),
                             text=[f"step {steps[i]}: {preempted[i]} request{'s' if preempted[i] != 1 else ''} "
                                   "preempted (blocks freed, recomputed later)" for i in hit],
                             hovertemplate="%{text}<extra></extra>"),
                  row=2, col=1, secondary_y=False)
    for column, label in (("running", "running requests"), ("waiting", "waiting requests")):
        fig.add_trace(go.Scatter(x=steps, y=_ints(df[column]), mode="lines", name=label, line_shape="hv",
                                 line=dict(color=_COLOURS[column], dash="dot" if column == "waiting" else "solid"),
                                 hovertemplate=f"step %{{x}}: %{{y}} {label}<extra></extra>"),
                      row=2, col=1, secondary_y=True)

    tp = _tp_size(df)
    # the legend sits in one row above the panels: on the right it would cover the requests axis
    fig.update_layout(barmode="stack", bargap=0.1, hovermode="closest", height=600,
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
                      title=f"Engine timeline: {len(steps)} steps, {sum(prefill)} prefill + {sum(decode)} decode "
                            f"tokens, {sum(preempted)} preemptions, peak KV use {max(kv_pct):.0f}%"
                            + (f", {eager} steps eager" if "graph_tokens" in df.columns else "")
                            + (f", tensor-parallel size {tp}" if tp > 1 else ""))
    fig.update_yaxes(title_text="tokens run", row=1, col=1)
    fig.update_yaxes(title_text="KV used (%)", range=[0, 105], row=2, col=1, secondary_y=False)
    # whole requests and steps: no 0.5 ticks when the counts are small
    fig.update_yaxes(title_text="requests", rangemode="tozero", tickformat="d", row=2, col=1, secondary_y=True)
    fig.update_xaxes(title_text="step", tickformat="d", row=2, col=1)
    return fig


def request_table(outputs):
    """One row per request (``RequestOutput``s, e.g. ``[engine.output(i) for i in ids]``): prompt and output
    tokens, prefix-cache hits at its last admission, preemptions, time to first token and end to end (ms,
    from arrival; empty while not there yet)."""
    import pandas as pd

    rows = []
    for o in outputs:
        m = o.metrics
        arrival, first, done = m.get("arrival"), m.get("first_token_time"), m.get("finished_time")
        rows.append({"request": o.request_id, "prompt_tokens": len(o.prompt_token_ids),
                     "output_tokens": len(o.token_ids), "cached_tokens": m.get("num_cached_tokens", 0),
                     "preemptions": m.get("num_preemptions", 0),
                     "ttft_ms": (first - arrival) * 1e3 if first is not None else None,
                     "e2e_ms": (done - arrival) * 1e3 if done is not None else None,
                     "finish_reason": o.finish_reason})
    return pd.DataFrame(rows, columns=["request", "prompt_tokens", "output_tokens", "cached_tokens", "preemptions",
                                       "ttft_ms", "e2e_ms", "finish_reason"])


def capacity_figure(table, *, fraction: float | None = None):
    """Max concurrency against memory fraction, one line per (prompt_len, output_len) of a
    ``concurrency_table``; ``fraction`` draws a vertical line at the fraction in use."""
    import plotly.graph_objects as go

    if table is None or len(table) == 0:
        raise WorkbenchError("the capacity table is empty: build it with concurrency_table(layout, memory_bytes=..., "
                             "fractions=[...], lengths=[(prompt_len, output_len), ...]) with at least one of each")
    _require(table, CAPACITY_COLUMNS, "the capacity table", "pass concurrency_table(...) as it is")
    fig = go.Figure()
    for (prompt_len, output_len), rows in table.groupby(["prompt_len", "output_len"], sort=False):
        rows = rows.sort_values("fraction")
        fig.add_trace(go.Scatter(
            x=[float(v) for v in rows["fraction"]], y=_ints(rows["max_concurrency"]), mode="lines+markers",
            name=f"{prompt_len}+{output_len} tokens",
            customdata=[[int(b), float(g)] for b, g in zip(rows["num_blocks"], rows["kv_gib"])],
            hovertemplate=(f"{prompt_len}+{output_len}-token requests<br>fraction %{{x:.2f}}: %{{y}} at once"
                           "<br>%{customdata[0]} blocks, %{customdata[1]:.3g} GiB<extra></extra>")))
    if fraction is not None:
        fig.add_vline(x=fraction, line_dash="dash", line_color="#555", annotation_text=f"fraction {fraction:g}")
    fig.update_layout(title="Requests the KV cache holds at once (each at its peak: prompt and all its output)",
                      xaxis_title="memory fraction the engine may use", yaxis_title="max concurrency",
                      yaxis_rangemode="tozero", yaxis_tickformat="d", legend_title="prompt+output")
    return fig
