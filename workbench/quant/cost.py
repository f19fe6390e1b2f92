"""What a plan's linears cost: measured time from a ``TimingCache`` where it has them, else the low-precision
share of the linear FLOPs.

    estimated_cost(graph, plan, timings=cache)        # {"ms": ..., "low_precision_flops": ...}
    times = GroupTimes(cache); times.group_ms(graph, linear_groups(graph)["layers.0.o"], "fp8")

Each group's linears are looked up in the cache (``TimingCache.linear_times``) by the op their format runs as
(``LINEAR_OPS``) and their weight shape (N, K). A group's time in a format is the best timing of each of its
linears, summed over the token counts at which the cache timed all of its bf16 linears (the profile's buckets);
where any of those is missing the time is NaN. SmoothQuant's explicit multiply (o, down) is not counted.
"""

from __future__ import annotations

import math
from typing import Any

from .plan import OPTIONS, PrecisionPlan, linear_groups

#: the op each format's linears run as (the key into a TimingCache)
LINEAR_OPS = {"bf16": "aten.linear.default", "fp8": "workbench.fp8_linear", "int8_sq": "workbench.int8_linear",
              "int8_wo": "workbench.w8_linear"}
#: a format's "activations" option -> whether its linears get a static input scale (``LinearShape.input_scale``)
_INPUT_SCALE = {"static": True, "dynamic": False}


class GroupTimes:
    """A ``TimingCache`` read once for every format's linear op: best ms per (op, N, K) -> tokens -> whether
    the activations had a static scale."""

    def __init__(self, cache) -> None:
        self.best: dict[tuple[str, int, int], dict[int, dict[bool | None, float]]] = {}
        for op in dict.fromkeys(LINEAR_OPS.values()):
            for shape, ms in cache.linear_times(op).items():
                self.best.setdefault((op, shape.n, shape.k), {}).setdefault(shape.tokens, {})[shape.input_scale] = ms

    def _one(self, op: str, n: int, k: int, tokens: int, input_scale: bool | None) -> float:
        """The best time at this shape; where the activation scaling asked for was not timed, the best of
        those that were."""
        slot = self.best.get((op, n, k), {}).get(tokens)
        if not slot:
            return math.nan
        return slot[input_scale] if input_scale in slot else min(slot.values())

    def group_ms(self, graph, group, fmt: str, options: dict[str, Any] | None = None) -> float:
        shapes = [tuple(graph.params[w].spec.shape) for w in group.weights]
        base_op = LINEAR_OPS["bf16"]
        token_sets = [set(self.best.get((base_op, n, k), {})) for n, k in shapes]
        tokens = set.intersection(*token_sets) if token_sets else set()
        if not tokens:
            return math.nan
        input_scale = _INPUT_SCALE.get((options or OPTIONS[fmt]).get("activations"))
        return sum(self._one(LINEAR_OPS[fmt], n, k, t, input_scale) for t in sorted(tokens) for n, k in shapes)


def group_flops(graph, group) -> int:
    """Linear FLOPs per token of a group: 2·N·K per weight (cost.matmul with M = 1)."""
    return sum(2 * math.prod(int(d) for d in graph.params[w].spec.shape) for w in group.weights)


def estimated_cost(graph, plan: PrecisionPlan, timings=None) -> dict[str, float | None]:
    """{"ms": the plan's linears' estimated time from ``timings`` (None without, or where any is untimed),
    "low_precision_flops": the fraction of linear FLOPs run in fp8 / int8 formats}."""
    plan.validate(graph)
    groups = linear_groups(graph)
    flops = {name: group_flops(graph, g) for name, g in groups.items()}
    total = sum(flops.values()) or 1
    low = sum(f for name, f in flops.items() if plan.format_of(name) != "bf16") / total
    ms = None
    if timings is not None:
        table = timings if isinstance(timings, GroupTimes) else GroupTimes(timings)
        per = [table.group_ms(graph, g, plan.format_of(name), plan.options(name)) for name, g in groups.items()]
        ms = sum(per) if all(math.isfinite(x) for x in per) else None
    return {"ms": ms, "low_precision_flops": low}
