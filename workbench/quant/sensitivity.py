"""Layer sensitivity: what quantizing each linear group alone costs, and plans chosen within a perplexity budget.

    report = sensitivity(program, stats, ids, timings=cache)      # one row per (group, format)
    report.table()                                                # rows groups, columns formats: ppl change in %
    plan, result = auto_plan(report, program, stats, ids, budget_pct=1.0)   # verified: result["ppl_delta_pct"]
    evaluate_plan(program, plan, stats, ids)                      # {"ppl", "ppl_delta_pct", "kl"} of any plan
    sensitivity_figure(report); pareto_figure(pareto_points(report, program, stats, ids))

**The probe.** ``ids`` are scored by ``evaluate.perplexity`` in sliding windows (``window`` tokens, a new
window every ``stride``). The unquantized program runs each window once; its log-probabilities at the
scored positions (each token after the first exactly once, as perplexity counts them) are kept
(``BaseLogits``: tokens x vocab x 4 bytes, on the CPU), so each quantized variant costs one pass. KL is
KL(base || quantized) of the next-token distributions, averaged over those scored positions.

**Rows.** Each row quantizes ONE group to one format, every other group as in ``base_plan`` (all "bf16"
by default), and compares with the *unquantized* program: ``ppl_delta_pct = 100 (ppl / base_ppl - 1)``.

**Timings.** With a ``TimingCache`` (``kernels/autotune.py``) each group's linears are looked up by op
(aten.linear.default for bf16, workbench.fp8_linear, int8_linear, w8_linear) and weight shape (N, K),
read from the cache keys (``instance_key``: x is [..., K], the weight [N, K]; the tokens M are x's
leading dims). A group's time in a format is the best timing of each of its linears, summed over the
token counts at which the cache timed all of its bf16 linears (the profile's buckets); where any of
those is missing the time is NaN. SmoothQuant's explicit multiply (o, down) is not counted.

**Auto plan.** Least sensitive groups first, each gets the fastest format (largest ``saved_ms`` where the
group is timed, else fp8 > int8_sq > int8_wo) whose single-group perplexity change still fits in what is
left of the budget; then the whole plan is evaluated, and while the verified change exceeds the budget
the most sensitive chosen groups go back to bf16, as many as their share of the verified change needs
to cover the excess (``_back_off``; the last allowed round drops them all). When a round verifies within
the budget and groups are left over, the single-group rows are rescaled by what the round measured
(verified change / sum of the chosen rows) and the groups that still fit are added (never one a round
backed off); the next round verifies that plan, and if it goes over, the last plan verified within the
budget is the result. Groups in ``base_plan.edited`` and groups the report does not cover keep their
format and are counted against the budget with their own rows; every other group starts from bf16,
whatever ``base_plan`` gave it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import WorkbenchError
from .plan import FORMATS, OPTIONS, PrecisionPlan, _unknown_group, linear_groups, model_fingerprint

if TYPE_CHECKING:
    import pandas as pd

REPORT_VERSION = 1
QUANT_FORMATS = ("fp8", "int8_sq", "int8_wo")
#: default speed order, fastest first: the tie-break where a group has no timings
SPEED_ORDER = ("fp8", "int8_sq", "int8_wo")
#: the op each format's linears run as (the key into a TimingCache)
LINEAR_OPS = {"bf16": "aten.linear.default", "fp8": "workbench.fp8_linear", "int8_sq": "workbench.int8_linear",
              "int8_wo": "workbench.w8_linear"}
COLUMNS = ["group", "layer", "kind", "format", "kl", "ppl", "ppl_delta_pct", "base_ms", "quant_ms", "saved_ms"]
METRICS = ("kl", "ppl", "ppl_delta_pct", "base_ms", "quant_ms", "saved_ms")


# ---- the report --------------------------------------------------------------------------------------------

@dataclass
class SensitivityReport:
    """One row per (group, format), in graph order: ``COLUMNS``, the ms columns always there (NaN where
    untimed); ``layer`` is an int, or None for lm_head. ``model`` (fingerprint), ``window``, ``stride`` and
    ``tokens`` say what it was measured on."""

    frame: "pd.DataFrame"
    base_ppl: float
    formats: list[str]
    model: str | None = None
    window: int | None = None
    stride: int | None = None
    tokens: int | None = None

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(self.frame["group"]))

    def to_json(self) -> dict[str, Any]:
        rows = [{k: _plain(v) for k, v in row.items()} for row in self.frame[COLUMNS].to_dict("records")]
        return {"version": REPORT_VERSION, "model": self.model, "base_ppl": self.base_ppl,
                "formats": list(self.formats), "window": self.window, "stride": self.stride, "tokens": self.tokens,
                "rows": rows}

    @classmethod
    def from_json(cls, obj: Any) -> "SensitivityReport":
        if not isinstance(obj, dict) or "rows" not in obj or "base_ppl" not in obj:
            raise WorkbenchError("a sensitivity report is a JSON object with \"rows\", \"base_ppl\" and \"formats\" "
                                 "(written by SensitivityReport.save); re-run sensitivity()")
        if obj.get("version", REPORT_VERSION) != REPORT_VERSION:
            raise WorkbenchError(f"sensitivity report version {obj.get('version')!r} is not supported (this workbench "
                                 f"reads {REPORT_VERSION}); re-run sensitivity()")
        bad = [f for f in obj.get("formats", []) if f not in FORMATS]
        if bad:
            raise WorkbenchError(f"sensitivity report: format {bad[0]!r} is unknown; formats are {', '.join(FORMATS)}")
        return cls(_frame(obj["rows"]), float(obj["base_ppl"]), list(obj.get("formats", [])), obj.get("model"),
                   obj.get("window"), obj.get("stride"), obj.get("tokens"))

    def save(self, path: str | Path) -> None:
        from ..env import atomic_write

        atomic_write(Path(path), (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityReport":
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except OSError as e:
            raise WorkbenchError(f"cannot read sensitivity report {path} ({e})") from None
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"sensitivity report {path} is not valid JSON ({e}); re-run sensitivity()") from None
        return cls.from_json(obj)

    def worst(self, fmt: str) -> str:
        """The group whose perplexity grows most when it alone is in ``fmt``."""
        rows = self.frame[self.frame["format"] == self._known(fmt)]
        return str(rows.loc[rows["ppl_delta_pct"].astype(float).idxmax(), "group"])

    def table(self, metric: str = "ppl_delta_pct"):
        """``metric`` per group (rows, graph order) and format (columns, the report's order)."""
        if metric not in METRICS:
            raise WorkbenchError(f"metric {metric!r} is not a column of the report; use one of {', '.join(METRICS)}")
        pivot = self.frame.pivot(index="group", columns="format", values=metric)
        return pivot.reindex(index=self.groups, columns=self.formats).astype(float)

    def delta(self, group: str, fmt: str) -> float:
        """The row's ppl_delta_pct; NaN where the report has no such row."""
        rows = self.frame[(self.frame["group"] == group) & (self.frame["format"] == fmt)]
        return float(rows["ppl_delta_pct"].iloc[0]) if len(rows) else math.nan

    def _known(self, fmt: str) -> str:
        if fmt not in self.formats:
            raise WorkbenchError(f"the report has no format {fmt!r}; it measured {', '.join(self.formats)}")
        return fmt

    def check_model(self, graph) -> None:
        """Refuse a report made on another model: its groups must be this graph's."""
        known = linear_groups(graph)
        stray = [g for g in self.groups if g not in known]
        fingerprint = model_fingerprint(graph)
        if stray or (self.model is not None and self.model != fingerprint):
            what = (f"names {len(stray)} groups this model does not have ({', '.join(stray[:4])})" if stray else
                    f"was measured on another model (fingerprint {self.model}, this graph's is {fingerprint})")
            raise WorkbenchError(f"the sensitivity report {what}; run sensitivity(program, stats, ids) on this model")


def _plain(v: Any) -> Any:
    """A JSON value: NaN -> None, numpy scalars -> Python."""
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _frame(rows: list[dict[str, Any]]):
    import pandas as pd

    frame = pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], columns=COLUMNS)
    for c in METRICS:
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype(float)
    # layer is an int or None (lm_head): object dtype keeps ints ints instead of floats with NaN
    frame["layer"] = pd.Series([None if _plain(x) is None else int(x) for x in frame["layer"]], dtype=object)
    return frame


# ---- the probe ---------------------------------------------------------------------------------------------

@dataclass
class BaseLogits:
    """The unquantized program on the probe: per window, log-probabilities at the scored positions."""

    ids: torch.Tensor
    window: int
    stride: int
    logprobs: list[torch.Tensor] = field(repr=False)
    ppl: float

    def matches(self, ids: torch.Tensor, window: int, stride: int) -> bool:
        return (window, stride) == (self.window, self.stride) and torch.equal(ids.reshape(-1).cpu(), self.ids)


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) of each window, as ``evaluate.perplexity`` walks them (checked per call)."""
    spans, scored_to = [], 1
    while scored_to < n:
        end = min(window, n) if scored_to == 1 else min(scored_to + stride, n)
        begin = max(0, end - window)
        if begin >= scored_to:
            begin = scored_to - 1
            end = min(begin + window, n)
        spans.append((begin, scored_to, end))
        scored_to = end
    return spans


def _probe_ids(ids: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    ids = torch.as_tensor(ids).reshape(-1).cpu()
    if window < 2 or stride < 1:
        raise WorkbenchError(f"window must be >= 2 and stride >= 1 (got window={window}, stride={stride})")
    if ids.numel() < window:
        raise WorkbenchError(f"the evaluation ids have {ids.numel()} tokens, fewer than one window of {window}: "
                             f"pass at least {window} tokens or a smaller window")
    return ids


class _Recorder:
    """A logits function that runs ``fn`` on each window and hands the scored rows' log-probs to ``sink``."""

    def __init__(self, fn, spans, sink) -> None:
        self.fn, self.spans, self.sink, self.i = fn, spans, sink, 0

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        begin, first, end = self.spans[self.i]
        if chunk.shape[-1] != end - begin:  # invariant: our windows are perplexity's windows
            raise WorkbenchError(f"window {self.i} has {chunk.shape[-1]} tokens, expected {end - begin}: "
                                 "sensitivity's windows no longer follow evaluate.perplexity's; report this bug")
        logits = self.fn(chunk)
        rows = logits[0, first - begin - 1:end - begin - 1].float()
        self.sink(self.i, torch.log_softmax(rows, dim=-1))
        self.i += 1
        return logits


@torch.no_grad()
def reference_logits(program, ids: torch.Tensor, *, window: int = 256, stride: int = 128) -> BaseLogits:
    """Run the unquantized ``program`` over ``ids`` once; what every variant is compared with."""
    from ..evaluate import logits_fn, perplexity

    ids = _probe_ids(ids, window, stride)
    spans = _windows(ids.numel(), window, stride)
    kept: list[torch.Tensor] = []
    result = perplexity(_Recorder(logits_fn(program), spans, lambda i, lp: kept.append(lp.cpu())),
                        ids.to(program.device), window=window, stride=stride)
    return BaseLogits(ids, window, stride, kept, result.perplexity)


@torch.no_grad()
def _measure(program, base: BaseLogits) -> dict[str, float]:
    """ppl of ``program`` on the probe, its change vs the base and the mean KL(base || program)."""
    from ..evaluate import logits_fn, perplexity

    kl_sum, rows = 0.0, 0

    def compare(i, lp):
        nonlocal kl_sum, rows
        ref = base.logprobs[i].to(lp.device)
        kl_sum += (ref.exp() * (ref - lp)).sum().double().item()
        rows += lp.shape[0]

    spans = _windows(base.ids.numel(), base.window, base.stride)
    ppl = perplexity(_Recorder(logits_fn(program), spans, compare), base.ids.to(program.device),
                     window=base.window, stride=base.stride).perplexity
    return {"ppl": ppl, "ppl_delta_pct": 100.0 * (ppl / base.ppl - 1.0), "kl": max(kl_sum / rows, 0.0)}


def evaluate_plan(program, plan: PrecisionPlan, stats, ids: torch.Tensor, *, window: int = 256, stride: int = 128,
                  base_logits: BaseLogits | None = None) -> dict[str, float]:
    """{"ppl", "ppl_delta_pct", "kl", "base_ppl"} of ``program`` under ``plan`` on ``ids``, against the
    unquantized program (``base_logits`` from ``reference_logits``, computed here when not given)."""
    from .apply import quantized_program

    ids = _probe_ids(ids, window, stride)
    if base_logits is None:
        base_logits = reference_logits(program, ids, window=window, stride=stride)
    elif not base_logits.matches(ids, window, stride):
        raise WorkbenchError("base_logits were computed on other ids, window or stride; compute them with "
                             "reference_logits(program, ids, window=..., stride=...) for this evaluation")
    result = _measure(quantized_program(program, plan, stats), base_logits)
    return {**result, "base_ppl": base_logits.ppl}


# ---- timings and cost --------------------------------------------------------------------------------------

def _parse_key(key: str) -> tuple[str, int, int, int, str | None] | None:
    """(op, tokens M, N, K, "static" | "dynamic" | None) of a linear's ``instance_key``; None if it is not one."""
    try:
        op, args, _ = json.loads(key)
        (x_shape, _), (w_shape, _) = args[0], args[1]
        n, k = (int(d) for d in w_shape)
        if int(x_shape[-1]) != k:
            return None
        tokens = math.prod(int(d) for d in x_shape[:-1])
    except (ValueError, TypeError, IndexError, KeyError):
        return None
    mode = None
    if op in (LINEAR_OPS["fp8"], LINEAR_OPS["int8_sq"]):
        mode = "static" if len(args) > 3 and args[3] is not None else "dynamic"
    return op, tokens, n, k, mode


class _Timings:
    """A TimingCache read as: best ms per (op, N, K) -> tokens -> activation mode."""

    def __init__(self, cache) -> None:
        self.best: dict[tuple[str, int, int], dict[int, dict[str | None, float]]] = {}
        for key, entry in getattr(cache, "entries", {}).items():
            parsed = _parse_key(key)
            ms = [float(t["ms"]) for t in entry.get("timings", []) if math.isfinite(float(t.get("ms", math.inf)))]
            if parsed is None or not ms:
                continue
            op, tokens, n, k, mode = parsed
            slot = self.best.setdefault((entry.get("op", op), n, k), {}).setdefault(tokens, {})
            slot[mode] = min(slot.get(mode, math.inf), min(ms))

    def _one(self, op: str, n: int, k: int, tokens: int, mode: str | None) -> float:
        slot = self.best.get((op, n, k), {}).get(tokens)
        if not slot:
            return math.nan
        return slot[mode] if mode in slot else min(slot.values())

    def group_ms(self, graph, group, fmt: str, options: dict[str, Any] | None = None) -> float:
        shapes = [tuple(graph.params[w].spec.shape) for w in group.weights]
        base_op = LINEAR_OPS["bf16"]
        token_sets = [set(self.best.get((base_op, n, k), {})) for n, k in shapes]
        tokens = set.intersection(*token_sets) if token_sets else set()
        if not tokens:
            return math.nan
        mode = (options or OPTIONS[fmt]).get("activations")
        return sum(self._one(LINEAR_OPS[fmt], n, k, t, mode) for t in sorted(tokens) for n, k in shapes)


def _flops(graph, group) -> int:
    """Linear FLOPs per token of a group: 2·N·K per weight (cost.matmul with M = 1)."""
    return sum(2 * math.prod(int(d) for d in graph.params[w].spec.shape) for w in group.weights)


def estimated_cost(graph, plan: PrecisionPlan, timings=None) -> dict[str, float | None]:
    """{"ms": the plan's linears' estimated time from ``timings`` (None without, or where any is untimed),
    "low_precision_flops": the fraction of linear FLOPs run in fp8 / int8 formats}."""
    plan.validate(graph)
    groups = linear_groups(graph)
    flops = {name: _flops(graph, g) for name, g in groups.items()}
    total = sum(flops.values()) or 1
    low = sum(f for name, f in flops.items() if plan.format_of(name) != "bf16") / total
    ms = None
    if timings is not None:
        table = timings if isinstance(timings, _Timings) else _Timings(timings)
        per = [table.group_ms(graph, g, plan.format_of(name), plan.options(name)) for name, g in groups.items()]
        ms = sum(per) if all(math.isfinite(x) for x in per) else None
    return {"ms": ms, "low_precision_flops": low}


# ---- sensitivity -------------------------------------------------------------------------------------------

def _check_formats(formats) -> list[str]:
    formats = list(formats)
    if not formats:
        raise WorkbenchError(f"no formats to measure; pass some of {', '.join(QUANT_FORMATS)}")
    for f in formats:
        if f not in FORMATS:
            raise WorkbenchError(f"format {f!r} is unknown; use some of {', '.join(QUANT_FORMATS)} "
                                 "(bf16 is the baseline every row is compared with)")
    return list(dict.fromkeys(formats))


def sensitivity(program, stats, ids: torch.Tensor, *, formats=QUANT_FORMATS, groups=None,
                base_plan: PrecisionPlan | None = None, window: int = 256, stride: int = 128, timings=None,
                progress: bool = True, **format_options) -> SensitivityReport:
    """Quantize one group at a time to each of ``formats`` (``format_options`` go to the formats that take
    them) and measure KL and the perplexity change against the unquantized program; see the module docstring."""
    graph = program.graph
    formats = _check_formats(formats)
    for key in format_options:
        if not any(key in OPTIONS[f] for f in formats):
            raise WorkbenchError(f"option {key!r} is taken by none of the formats {', '.join(formats)} "
                                 f"(options: {', '.join(sorted({o for f in formats for o in OPTIONS[f]})) or 'none'})")
    known = linear_groups(graph)
    if isinstance(groups, str):
        groups = [groups]
    if groups is None:
        chosen = list(known)
    else:
        for g in groups:
            if g not in known:
                raise WorkbenchError(_unknown_group(g, known))
        chosen = [g for g in known if g in set(groups)]  # graph order
    base_plan = (base_plan or PrecisionPlan.uniform(graph, "bf16")).validate(graph)
    ids = _probe_ids(ids, window, stride)
    base = reference_logits(program, ids, window=window, stride=stride)
    table = _Timings(timings) if timings is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen) * len(formats), desc="sensitivity", unit="variant")
    from .apply import quantized_program

    measured: dict[str, dict[str, float]] = {}  # plan JSON -> numbers: a row equal to the base plan runs once
    rows = []
    for name in chosen:
        g = known[name]
        base_ms = table.group_ms(graph, g, "bf16") if table else math.nan
        for fmt in formats:
            options = {k: v for k, v in format_options.items() if k in OPTIONS[fmt]}
            plan = base_plan.with_format(name, fmt, **options).validate(graph)
            key = plan.dumps()
            if key not in measured:
                measured[key] = _measure(quantized_program(program, plan, stats), base)
            quant_ms = table.group_ms(graph, g, fmt, plan.options(name)) if table else math.nan
            rows.append({"group": name, "layer": g.layer, "kind": g.kind, "format": fmt, **measured[key],
                         "base_ms": base_ms, "quant_ms": quant_ms, "saved_ms": base_ms - quant_ms})
            if bar is not None:
                bar.set_postfix_str(f"{name} {fmt}")
                bar.update(1)
    if bar is not None:
        bar.close()
    return SensitivityReport(_frame(rows), base.ppl, formats, model_fingerprint(graph), window, stride, ids.numel())


# ---- auto plan ---------------------------------------------------------------------------------------------

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


def _auto_plan(report, program, stats, base: BaseLogits, *, budget_pct, base_plan, timings, progress, max_rounds):
    graph = program.graph
    report.check_model(graph)
    if max_rounds < 1:
        raise WorkbenchError(f"max_rounds must be >= 1 (one verification at least), got {max_rounds}")
    if not math.isfinite(budget_pct) or budget_pct < 0:
        raise WorkbenchError(f"budget_pct is the perplexity increase allowed in %, >= 0; got {budget_pct}")
    base_plan = (base_plan or PrecisionPlan.uniform(graph, "bf16")).validate(graph)
    known = linear_groups(graph)
    covered = set(report.groups)
    free = [g for g in known if g in covered and g not in base_plan.edited]
    # saved ms per (group, format): from the given cache, else the report's column
    if timings is not None:
        table = _Timings(timings)
        saved = {(g, f): table.group_ms(graph, known[g], "bf16") - table.group_ms(graph, known[g], f)
                 for g in free for f in report.formats}
    else:
        saved = {(r["group"], r["format"]): float(r["saved_ms"]) for r in report.frame.to_dict("records")}

    plan = base_plan
    for g in free:
        plan = plan.with_format(g, "bf16")
    # what the kept groups already cost, by their own rows
    fixed_pct = sum(max(report.delta(g, plan.format_of(g)), 0.0) for g in known
                    if g not in free and plan.format_of(g) != "bf16"
                    and math.isfinite(report.delta(g, plan.format_of(g))))
    spent = fixed_pct
    options = {g: _options_of(report, g, saved) for g in free}
    flops = {g: _flops(graph, known[g]) for g in free}
    visit = sorted((g for g in free if options[g]), key=lambda g: (min(d for _, d in options[g]), -flops[g]))
    chosen: dict[str, tuple[str, float]] = {}
    for g in visit:
        for fmt, delta in options[g]:
            if spent + max(delta, 0.0) <= budget_pct:
                chosen[g] = (fmt, delta)
                spent += max(delta, 0.0)
                break

    history, backed_off, added, dropped = [], [], [], set()
    best = None  # (plan, numbers, chosen) of the best verified plan within the budget so far
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_rounds, desc="auto plan", unit="round")
    from .apply import quantized_program

    for round_ in range(1, max_rounds + 1):
        candidate = plan
        for g, (fmt, _) in chosen.items():
            candidate = candidate.with_format(g, fmt)
        candidate.validate(graph)
        result = _measure(quantized_program(program, candidate, stats), base)
        estimate = sum(max(d, 0.0) for _, d in chosen.values())
        history.append({"round": round_, "quantized": {g: f for g, (f, _) in chosen.items()},
                        "estimate_pct": estimate, "backed_off": backed_off, "added": added, **result})
        if bar is not None:
            bar.update(1)
        if result["ppl_delta_pct"] <= budget_pct:
            best = (candidate, result, dict(chosen))
            # fill: the single-group rows over- or underestimate the whole plan's change; rescaled by what
            # this round measured, do more groups still fit? (never groups a round had to back off)
            if round_ == max_rounds:
                break
            quantized_pct = result["ppl_delta_pct"] - fixed_pct
            ratio = quantized_pct / estimate if estimate > 0 and quantized_pct > 0 else 1.0
            added = []
            for g in visit:
                if g in chosen or g in dropped:
                    continue
                for fmt, delta in options[g]:
                    if fixed_pct + (estimate + max(delta, 0.0)) * ratio <= budget_pct:
                        chosen[g] = (fmt, delta)
                        estimate += max(delta, 0.0)
                        added.append(g)
                        break
            if not added:
                break
            backed_off = []
            continue
        if best is not None:  # a fill went over: keep the last plan verified within the budget
            break
        if not chosen or round_ == max_rounds:
            break
        value = {g: saved.get((g, f), math.nan) for g, (f, _) in chosen.items()}
        if not all(math.isfinite(v) for v in value.values()):  # one unit for all: FLOPs unless all are timed
            value = {g: float(flops[g]) for g in chosen}
        backed_off = _back_off(chosen, result["ppl_delta_pct"] - fixed_pct, result["ppl_delta_pct"] - budget_pct,
                               value, everything=round_ + 1 == max_rounds)
        for g in backed_off:
            del chosen[g]
        dropped.update(backed_off)
        added = []
    if bar is not None:
        bar.close()
    if best is not None:
        candidate, final, chosen = best
    else:
        final = history[-1]
    if final["ppl_delta_pct"] > budget_pct and chosen:  # rounds ran out with groups still chosen: none is safe
        chosen = {}
        candidate = plan.validate(graph)
        result = _measure(quantized_program(program, candidate, stats), base)
        history.append({"round": len(history) + 1, "quantized": {}, "estimate_pct": 0.0,
                        "backed_off": list(final["quantized"]), **result})
        final = history[-1]
    info = {"ppl": final["ppl"], "ppl_delta_pct": final["ppl_delta_pct"], "kl": final["kl"],
            "rounds": len(history), "history": history, "budget_pct": budget_pct,
            "within_budget": final["ppl_delta_pct"] <= budget_pct, "base_ppl": base.ppl,
            **{f"estimated_{k}": v for k, v in estimated_cost(graph, candidate, timings).items()}}
    return candidate, info


def auto_plan(report: SensitivityReport, program, stats, ids: torch.Tensor, *, budget_pct: float = 1.0,
              base_plan: PrecisionPlan | None = None, timings=None, window: int = 256, stride: int = 128,
              progress: bool = True, max_rounds: int = 8) -> tuple[PrecisionPlan, dict[str, Any]]:
    """The fastest plan found whose verified perplexity is at most ``budget_pct`` % above the unquantized
    program's, and {"ppl", "ppl_delta_pct", "kl", "rounds", "history", "within_budget", ...}; see the module
    docstring. ``within_budget`` is False only when the groups it may not change already exceed the budget.
    At most ``max_rounds`` verifications (with ``max_rounds=1``, one more of the fallback when the first fails)."""
    ids = _probe_ids(ids, window, stride)
    base = reference_logits(program, ids, window=window, stride=stride)
    return _auto_plan(report, program, stats, base, budget_pct=budget_pct, base_plan=base_plan, timings=timings,
                      progress=progress, max_rounds=max_rounds)


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
    ids = _probe_ids(ids, window, stride)
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
        plan, info = _auto_plan(report, program, stats, base, budget_pct=float(budget), base_plan=base_plan,
                                timings=timings, progress=False, max_rounds=max_rounds)
        candidates.append((f"auto +{budget:g}%", "auto", plan, info))
    points: dict[str, dict[str, Any]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(candidates), desc="pareto points", unit="plan")
    for name, kind, plan, info in candidates:
        key = json.dumps(plan.groups, sort_keys=True) + plan.kv_cache
        if key in points:
            points[key]["name"] += f" = {name}"
        else:
            numbers = info or _measure(quantized_program(program, plan, stats), base)
            points[key] = {"name": name, "kind": kind, "plan": plan, "ppl": numbers["ppl"],
                           "ppl_delta_pct": numbers["ppl_delta_pct"], "kl": numbers["kl"],
                           **estimated_cost(graph, plan, timings)}
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return list(points.values())


# ---- figures -----------------------------------------------------------------------------------------------

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


def sensitivity_figure(report: SensitivityReport, metric: str = "ppl_delta_pct", *, log_y: bool = False):
    """One line per format: ``metric`` when only that group is quantized, groups in graph order on x.
    ``log_y`` plots a log axis (values <= 0 are not drawn)."""
    import plotly.graph_objects as go

    table = report.table(metric)
    fig = go.Figure()
    for fmt in report.formats:
        fig.add_trace(go.Scatter(x=list(table.index), y=table[fmt].tolist(), mode="lines+markers", name=fmt,
                                 hovertemplate=f"%{{x}} in {fmt}: {metric} %{{y:.4g}}<extra></extra>"))
    base = f"{report.base_ppl:.4g}"
    fig.update_layout(title=f"Sensitivity: one group quantized at a time (unquantized ppl {base}"
                            f"{f', {report.tokens} tokens' if report.tokens else ''})",
                      xaxis_title="linear group (graph order)", yaxis_title=metric, legend_title="format",
                      yaxis_type="log" if log_y else "linear")
    return fig


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
