"""Candidate precision plans set against each other: verified perplexity change against estimated speed.

    points = pareto_points(report, program, stats, ids, timings=cache)   # base, uniform plans, auto plans
    pareto_front(points); pareto_figure(points)

Accuracy is verified on the probe (``probe.py``); cost is estimated (``cost.py``): the plan's linear time
from a ``TimingCache``, or without one the low-precision share of the linear FLOPs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from ..errors import WorkbenchError
from ..progress import progress_bar
from .auto_plan import auto_plan
from .cost import estimated_cost
from .plan import PrecisionPlan
from .probe import measure, probe_ids, reference_logits
from .sensitivity import SensitivityReport


def pareto_points(report: SensitivityReport, program, stats, ids: torch.Tensor, *,
                  budgets=(0.25, 0.5, 1, 2, 5), base_plan: PrecisionPlan | None = None, timings=None,
                  window: int = 256, stride: int = 128, progress: bool = True,
                  max_rounds: int = 8) -> list[dict[str, Any]]:
    """Candidate plans with verified accuracy and estimated cost: the base plan, each uniform plan of the
    report's formats (lm_head bf16, edited groups kept) and ``auto_plan`` at each budget; plans that come out
    equal are one point (its name lists them). Each point: name, kind, plan, ppl, ppl_delta_pct, kl, ms
    (None without timings), low_precision_flops."""
    from .apply import quantized_program

    graph = program.graph
    report.check_model(graph)
    ids = probe_ids(ids, window, stride)
    base = reference_logits(program, ids, window=window, stride=stride)
    base_plan = (base_plan or PrecisionPlan.uniform(graph, "bf16")).validate(graph)
    candidates: list[tuple[str, str, PrecisionPlan, dict | None]] = [("base", "base", base_plan, None)]
    for fmt in report.formats:
        if fmt == "bf16":
            continue
        plan = PrecisionPlan.uniform(graph, fmt, kv_cache=base_plan.kv_cache)
        for g in base_plan.edited:
            plan = plan.with_format(g, base_plan.format_of(g), edited=True,
                                    **({} if g == "kv_cache" else
                                       {k: v for k, v in base_plan.groups[g].items() if k != "format"}))
        candidates.append((f"uniform {fmt}", "uniform", plan, None))
    for budget in budgets:
        plan, info = auto_plan(report, program, stats, ids, budget_pct=float(budget), base_plan=base_plan,
                               timings=timings, window=window, stride=stride, progress=False,
                               max_rounds=max_rounds, base_logits=base)
        candidates.append((f"auto +{budget:g}%", "auto", plan, info))
    points: dict[str, dict[str, Any]] = {}
    with progress_bar(len(candidates), "pareto points", "plan", enabled=progress) as bar:
        for name, kind, plan, info in candidates:
            key = json.dumps(plan.groups, sort_keys=True) + plan.kv_cache
            if key in points:
                points[key]["name"] += f" = {name}"
            else:
                numbers = info or measure(quantized_program(program, plan, stats), base)
                points[key] = {"name": name, "kind": kind, "plan": plan, "ppl": numbers["ppl"],
                               "ppl_delta_pct": numbers["ppl_delta_pct"], "kl": numbers["kl"],
                               **estimated_cost(graph, plan, timings)}
            bar.update(1)
    return list(points.values())


def _cost_axis(points: list[dict[str, Any]]) -> tuple[str, bool]:
    """The x of a Pareto plot: "ms" (lower is better) where every point has it, else low_precision_flops."""
    if points and all(p.get("ms") is not None and math.isfinite(p["ms"]) for p in points):
        return "ms", True
    if all(p.get("low_precision_flops") is not None for p in points):
        return "low_precision_flops", False
    raise WorkbenchError("each Pareto point needs \"ms\" or \"low_precision_flops\" beside \"ppl_delta_pct\" "
                         "(pareto_points makes them)")


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats in both accuracy (ppl_delta_pct) and cost, sorted by cost."""
    axis, lower_better = _cost_axis(points)
    cost = (lambda p: p[axis]) if lower_better else (lambda p: -p[axis])
    front = [p for p in points
             if not any(cost(q) <= cost(p) and q["ppl_delta_pct"] <= p["ppl_delta_pct"]
                        and (cost(q) < cost(p) or q["ppl_delta_pct"] < p["ppl_delta_pct"]) for q in points)]
    return sorted(front, key=cost)


def pareto_figure(points: list[dict[str, Any]]):
    """Accuracy cost (ppl change in %) against estimated latency (or the low-precision share of FLOPs where
    no timings exist): every plan, and the Pareto front joined by a line."""
    import plotly.graph_objects as go

    axis, lower_better = _cost_axis(points)
    front = pareto_front(points)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p[axis] for p in points], y=[p["ppl_delta_pct"] for p in points],
                             mode="markers+text", name="plans", text=[p["name"] for p in points],
                             textposition="top center", marker={"size": 9, "color": "#9e9e9e"}))
    fig.add_trace(go.Scatter(x=[p[axis] for p in front], y=[p["ppl_delta_pct"] for p in front],
                             mode="lines+markers", name="Pareto front", text=[p["name"] for p in front],
                             marker={"size": 11, "color": "#d62728"}, line={"color": "#d62728"},
                             hovertemplate="%{text}<br>%{x:.4g}, %{y:.3g}%<extra></extra>"))
    xtitle = ("estimated linear time (ms, lower is faster)" if lower_better else
              "share of linear FLOPs in fp8/int8 (higher is faster)")
    fig.update_layout(title="Precision plans: perplexity cost vs speed", xaxis_title=xtitle,
                      yaxis_title="perplexity change vs unquantized (%)")
    return fig
