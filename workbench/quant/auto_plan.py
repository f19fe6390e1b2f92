"""The auto plan: the fastest plan found whose verified perplexity stays within a budget, from a sensitivity report.

    plan, info = auto_plan(report, program, stats, ids, budget_pct=1.0)   # verified: info["ppl_delta_pct"]

It runs in rounds of named steps:

1. **choose**: least sensitive groups first, each gets the fastest format (largest ``saved_ms`` where the
   group is timed, else fp8 > int8_sq > int8_wo) whose single-group perplexity change still fits in what is
   left of the budget;
2. **verify**: the whole plan is measured on the probe (``probe.py``); every verification is a round;
3. **back off**: while the verified change exceeds the budget, the most sensitive chosen groups go back to
   bf16, as many as their share of the verified change needs to cover the excess (the last allowed round
   drops them all);
4. **fill**: when a round verifies within the budget and groups are left over, the single-group rows are
   rescaled by what the round measured (verified change / sum of the chosen rows) and the groups that still
   fit are added (never one a round backed off); the next round verifies that plan, and if it goes over,
   the last plan verified within the budget is the result.

Groups in ``base_plan.edited`` and groups the report does not cover keep their format and are counted against
the budget with their own rows; every other group starts from bf16, whatever ``base_plan`` gave it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import WorkbenchError
from ..progress import progress_bar
from .cost import GroupTimes, estimated_cost, group_flops
from .plan import PrecisionPlan, linear_groups
from .probe import BaseLogits, base_for, measure, probe_ids
from .sensitivity import SensitivityReport

#: default speed order, fastest first: the tie-break where a group has no timings
SPEED_ORDER = ("fp8", "int8_sq", "int8_wo")


def _options_of(report: SensitivityReport, name: str, saved: dict[tuple[str, str], float]) -> list[tuple[str, float]]:
    """(format, single-group ppl change) of a group's quantized rows, fastest first; formats timed as no
    faster than bf16 are left out."""
    found = []
    for fmt in report.formats:
        delta = report.delta(name, fmt)
        if fmt == "bf16" or not math.isfinite(delta):
            continue
        s = saved.get((name, fmt), math.nan)
        if math.isfinite(s) and s <= 0:
            continue
        found.append((fmt, delta, s))
    if found and all(math.isfinite(s) for _, _, s in found):
        found.sort(key=lambda o: -o[2])
    else:
        found.sort(key=lambda o: SPEED_ORDER.index(o[0]) if o[0] in SPEED_ORDER else len(SPEED_ORDER))
    return [(fmt, delta) for fmt, delta, _ in found]


@dataclass
class _Search:
    """What the rounds share. ``start`` is the base plan with every free group in bf16; ``fixed_pct`` what the
    groups it keeps cost by their rows; ``visit`` the free groups that have options, least sensitive first (of
    equal sensitivity, most FLOPs first). ``chosen`` maps a group to (format, its row's ppl change);
    ``dropped`` holds the groups a round backed off, never chosen again."""

    budget_pct: float
    start: PrecisionPlan
    fixed_pct: float
    visit: list[str]
    options: dict[str, list[tuple[str, float]]]
    saved: dict[tuple[str, str], float]
    flops: dict[str, int]
    chosen: dict[str, tuple[str, float]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)

    def candidate(self, graph) -> PrecisionPlan:
        plan = self.start
        for g, (fmt, _) in self.chosen.items():
            plan = plan.with_format(g, fmt)
        return plan.validate(graph)

    def estimate_pct(self) -> float:
        """The chosen groups' change by their rows (negative rows count as 0)."""
        return sum(max(d, 0.0) for _, d in self.chosen.values())


def _search(report: SensitivityReport, graph, budget_pct: float, base_plan: PrecisionPlan | None,
            timings) -> _Search:
    """The groups free to choose, their options and worth, and the plan they start from."""
    base_plan = (base_plan or PrecisionPlan.uniform(graph, "bf16")).validate(graph)
    known = linear_groups(graph)
    covered = set(report.groups)
    free = [g for g in known if g in covered and g not in base_plan.edited]
    # saved ms per (group, format): from the given cache, else the report's column
    if timings is not None:
        table = GroupTimes(timings)
        saved = {(g, f): table.group_ms(graph, known[g], "bf16") - table.group_ms(graph, known[g], f)
                 for g in free for f in report.formats}
    else:
        saved = {(r["group"], r["format"]): float(r["saved_ms"]) for r in report.frame.to_dict("records")}

    start = base_plan
    for g in free:
        start = start.with_format(g, "bf16")
    # what the kept groups already cost, by their own rows
    fixed_pct = sum(max(report.delta(g, start.format_of(g)), 0.0) for g in known
                    if g not in free and start.format_of(g) != "bf16"
                    and math.isfinite(report.delta(g, start.format_of(g))))
    options = {g: _options_of(report, g, saved) for g in free}
    flops = {g: group_flops(graph, known[g]) for g in free}
    visit = sorted((g for g in free if options[g]), key=lambda g: (min(d for _, d in options[g]), -flops[g]))
    return _Search(budget_pct, start, fixed_pct, visit, options, saved, flops)


def _choose(search: _Search) -> None:
    """Step 1: each group in visiting order gets its fastest format whose row fits what is left of the budget."""
    spent = search.fixed_pct
    for g in search.visit:
        for fmt, delta in search.options[g]:
            if spent + max(delta, 0.0) <= search.budget_pct:
                search.chosen[g] = (fmt, delta)
                spent += max(delta, 0.0)
                break


def _fill(search: _Search, verified_pct: float) -> list[str]:
    """Step 4, after a round verified ``verified_pct`` within the budget: the rows over- or underestimate the
    whole plan's change; rescaled by what the round measured, do more groups fit? Adds them to ``chosen`` (never
    groups a round backed off) and returns them, in visiting order."""
    estimate = search.estimate_pct()
    quantized_pct = verified_pct - search.fixed_pct
    ratio = quantized_pct / estimate if estimate > 0 and quantized_pct > 0 else 1.0
    added = []
    for g in search.visit:
        if g in search.chosen or g in search.dropped:
            continue
        for fmt, delta in search.options[g]:
            if search.fixed_pct + (estimate + max(delta, 0.0)) * ratio <= search.budget_pct:
                search.chosen[g] = (fmt, delta)
                estimate += max(delta, 0.0)
                added.append(g)
                break
    return added


def _back_off(chosen: dict[str, tuple[str, float]], quantized_pct: float, excess_pct: float,
              value: dict[str, float], *, everything: bool) -> list[str]:
    """The chosen groups to set back to bf16: most sensitive first (of equal sensitivity, the one worth
    least: ms saved, else FLOPs), until their estimated share of the verified change covers the excess.

    Single-group changes do not add up exactly, so each group's share is its single-group change
    rescaled to ``quantized_pct`` (the verified change less what the kept groups cost by their rows);
    when the rows give the chosen groups no cost at all, they share it equally. ``everything`` (the
    last round allowed) and a verified change the chosen groups cannot explain drop them all."""
    order = sorted(chosen, key=lambda g: (-chosen[g][1], value[g]))
    if everything or quantized_pct <= 0:
        return order
    raw = {g: max(d, 0.0) for g, (_, d) in chosen.items()}
    total = sum(raw.values())
    share = {g: quantized_pct * (raw[g] / total if total > 0 else 1 / len(chosen)) for g in chosen}
    dropped, covered = [], 0.0
    for g in order:
        dropped.append(g)
        covered += share[g]
        if covered >= excess_pct:
            break
    return dropped


def _back_off_step(search: _Search, verified_pct: float, *, everything: bool) -> list[str]:
    """Step 3, after a round verified ``verified_pct`` over the budget: drops groups from ``chosen`` (see
    ``_back_off``) and returns them."""
    chosen = search.chosen
    value = {g: search.saved.get((g, f), math.nan) for g, (f, _) in chosen.items()}
    if not all(math.isfinite(v) for v in value.values()):  # one unit for all: FLOPs unless all are timed
        value = {g: float(search.flops[g]) for g in chosen}
    backed_off = _back_off(chosen, verified_pct - search.fixed_pct, verified_pct - search.budget_pct, value,
                           everything=everything)
    for g in backed_off:
        del chosen[g]
    search.dropped.update(backed_off)
    return backed_off


def _rounds(search: _Search, graph, verify, max_rounds: int,
            bar) -> tuple[PrecisionPlan, dict[str, float], list[dict]]:
    """Step 2 (``verify(plan)``: its numbers on the probe) and then 3 or 4, until a plan verifies within the
    budget and nothing more fits, a fill goes over, or the rounds run out: (the plan, its verified numbers,
    the history of rounds)."""
    history, backed_off, added = [], [], []
    best = None  # (plan, numbers, chosen) of the best verified plan within the budget so far
    for round_ in range(1, max_rounds + 1):
        candidate = search.candidate(graph)
        result = verify(candidate)
        history.append({"round": round_, "quantized": {g: f for g, (f, _) in search.chosen.items()},
                        "estimate_pct": search.estimate_pct(), "backed_off": backed_off, "added": added, **result})
        bar.update(1)
        if result["ppl_delta_pct"] <= search.budget_pct:
            best = (candidate, result, dict(search.chosen))
            if round_ == max_rounds:
                break
            added = _fill(search, result["ppl_delta_pct"])
            if not added:
                break
            backed_off = []
            continue
        if best is not None:  # a fill went over: keep the last plan verified within the budget
            break
        if not search.chosen or round_ == max_rounds:
            break
        backed_off = _back_off_step(search, result["ppl_delta_pct"], everything=round_ + 1 == max_rounds)
        added = []
    if best is None:
        return candidate, history[-1], history
    candidate, final, search.chosen = best
    return candidate, final, history


def _auto_plan(report, program, stats, base: BaseLogits, *, budget_pct, base_plan, timings, progress, max_rounds):
    graph = program.graph
    report.check_model(graph)
    if max_rounds < 1:
        raise WorkbenchError(f"max_rounds must be >= 1 (one verification at least), got {max_rounds}")
    if not math.isfinite(budget_pct) or budget_pct < 0:
        raise WorkbenchError(f"budget_pct is the perplexity increase allowed in %, >= 0; got {budget_pct}")
    search = _search(report, graph, budget_pct, base_plan, timings)
    _choose(search)
    from .apply import quantized_program

    def verify(plan: PrecisionPlan) -> dict[str, float]:
        return measure(quantized_program(program, plan, stats), base)

    with progress_bar(max_rounds, "auto plan", "round", enabled=progress) as bar:
        candidate, final, history = _rounds(search, graph, verify, max_rounds, bar)
    if final["ppl_delta_pct"] > budget_pct and search.chosen:  # rounds ran out with groups still chosen: none is safe
        search.chosen = {}
        candidate = search.start.validate(graph)
        history.append({"round": len(history) + 1, "quantized": {}, "estimate_pct": 0.0,
                        "backed_off": list(final["quantized"]), **verify(candidate)})
        final = history[-1]
    info = {"ppl": final["ppl"], "ppl_delta_pct": final["ppl_delta_pct"], "kl": final["kl"],
            "rounds": len(history), "history": history, "budget_pct": budget_pct,
            "within_budget": final["ppl_delta_pct"] <= budget_pct, "base_ppl": base.ppl,
            **{f"estimated_{k}": v for k, v in estimated_cost(graph, candidate, timings).items()}}
    return candidate, info


def auto_plan(report: SensitivityReport, program, stats, ids: torch.Tensor, *, budget_pct: float = 1.0,
              base_plan: PrecisionPlan | None = None, timings=None, window: int = 256, stride: int = 128,
              progress: bool = True, max_rounds: int = 8,
              base_logits: BaseLogits | None = None) -> tuple[PrecisionPlan, dict[str, Any]]:
    """The fastest plan found whose verified perplexity is at most ``budget_pct`` % above the unquantized
    program's, and {"ppl", "ppl_delta_pct", "kl", "rounds", "history", "within_budget", ...}; see the module
    docstring. ``within_budget`` is False only when the groups it may not change already exceed the budget.
    At most ``max_rounds`` verifications (with ``max_rounds=1``, one more of the fallback when the first fails).
    ``base_logits`` (``probe.reference_logits`` of these ids, window and stride) are computed here when not given."""
    ids = probe_ids(ids, window, stride)
    base = base_for(program, ids, window, stride, base_logits)
    return _auto_plan(report, program, stats, base, budget_pct=budget_pct, base_plan=base_plan, timings=timings,
                      progress=progress, max_rounds=max_rounds)
