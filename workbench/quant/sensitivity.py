"""Layer sensitivity: what quantizing each linear group alone costs, one row per (group, format).

    report = sensitivity(program, stats, ids, timings=cache)      # one row per (group, format)
    sweep = plan_sweep(program, stats, ids); print(sweep)        # a CPU-sized subset, with its time estimate
    report = sensitivity(program, stats, ids, groups=sweep.groups)
    report.table()                                                # rows groups, columns formats: ppl change in %
    report.save(path); SensitivityReport.load(path)               # plain JSON
    sensitivity_figure(report)

**Rows.** Each row quantizes ONE group to one format, every other group as in ``base_plan`` (all "bf16"
by default), and compares with the *unquantized* program on the probe (``probe.py``: sliding windows of
``ids``, KL and perplexity): ``ppl_delta_pct = 100 (ppl / base_ppl - 1)``.

**Timings.** With a ``TimingCache`` the rows carry each group's time in bf16 and in the row's format and
what the format saves (``cost.py``); NaN where the cache lacks a linear.

What the rows are for: ``auto_plan.py`` chooses a plan within a perplexity budget from them, ``pareto.py``
sets candidate plans against each other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import WorkbenchError
from ..progress import progress_bar
from .cost import GroupTimes
from .plan import FORMATS, OPTIONS, PrecisionPlan, _unknown_group, linear_groups, model_fingerprint
from .probe import measure, probe_ids, reference_logits

if TYPE_CHECKING:
    import pandas as pd

REPORT_VERSION = 1
QUANT_FORMATS = ("fp8", "int8_sq", "int8_wo")
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


# ---- the sweep ---------------------------------------------------------------------------------------------

def _check_formats(formats) -> list[str]:
    formats = list(formats)
    if not formats:
        raise WorkbenchError(f"no formats to measure; pass some of {', '.join(QUANT_FORMATS)}")
    for f in formats:
        if f not in FORMATS:
            raise WorkbenchError(f"format {f!r} is unknown; use some of {', '.join(QUANT_FORMATS)} "
                                 "(bf16 is the baseline every row is compared with)")
    return list(dict.fromkeys(formats))


#: What a sweep planned without a budget may take on a CPU (a notebook's first run): a few minutes
CPU_SWEEP_BUDGET_S = 180.0


@dataclass
class SweepPlan:
    """The groups and formats a sensitivity sweep will measure, and how long it should take (``plan_sweep``)."""

    groups: list[str]
    formats: list[str]
    total_groups: int
    seconds_per_variant: float
    device: str
    budget_s: float | None
    full_switch: str = "plan_sweep(..., full=True)"  # how the caller asks for the full sweep, for the message

    @property
    def full(self) -> bool:
        return len(self.groups) == self.total_groups

    @property
    def variants(self) -> int:
        return len(self.groups) * len(self.formats)

    @property
    def estimate_s(self) -> float:
        return self.variants * self.seconds_per_variant

    @property
    def full_estimate_s(self) -> float:
        return self.total_groups * len(self.formats) * self.seconds_per_variant

    def __str__(self) -> str:
        per = f"{self.seconds_per_variant:.1f} s a variant on {self.device}"
        if self.full:
            return (f"full sweep: {self.total_groups} groups x {len(self.formats)} formats = {self.variants} variants, "
                    f"about {_duration(self.estimate_s)} ({per})")
        return (f"quick sweep: {len(self.groups)} of {self.total_groups} groups (every kind, in layers spread over the "
                f"model) x {len(self.formats)} formats = {self.variants} variants, about {_duration(self.estimate_s)} "
                f"({per}); the others stay unmeasured (grey in the widget; the auto plan leaves them in bf16). The "
                f"full sweep ({self.total_groups * len(self.formats)} variants) takes about "
                f"{_duration(self.full_estimate_s)}: {self.full_switch}")

    __repr__ = __str__


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def plan_sweep(program, stats, ids: torch.Tensor, *, formats=QUANT_FORMATS, full: bool | None = None,
               budget_s: float | None = None, window: int = 256, stride: int = 128,
               seconds_per_variant: float | None = None) -> SweepPlan:
    """Which groups ``sensitivity`` should measure to finish within ``budget_s`` seconds (default: no limit on a
    GPU, ``CPU_SWEEP_BUDGET_S`` on a CPU), from the time a variant takes here (measured on the same probe: the
    first group and the largest in the first format, the slower of the two counted for every variant).
    ``full=True`` takes every group whatever the time; ``full=False`` the budget's subset even when everything
    would fit. A subset keeps every kind of group (q/k/v, o, gate/up, down,
    lm_head) and spreads its layers from the first to the last, so the sweep still shows where in depth
    quantization hurts. Print the plan to see the estimate before starting, then pass ``groups=plan.groups``.
    ``seconds_per_variant``, when known (a previous plan's), skips the timing run."""
    import time

    from .apply import quantized_program

    graph = program.graph
    formats = _check_formats(formats)
    known = linear_groups(graph)
    if not known:
        raise WorkbenchError("the graph has no linear groups to measure")
    device = str(program.device)
    if budget_s is None and not device.startswith("cuda"):
        budget_s = CPU_SWEEP_BUDGET_S
    per = seconds_per_variant
    if per is None:  # the first group and the largest (lm_head's dequantized reference costs most): the slower
        probe = probe_ids(ids, window, stride)
        base = reference_logits(program, probe, window=window, stride=stride)
        largest = max(known, key=lambda n: sum(graph.params[w].spec.numel({}) for w in known[n].weights))
        per = 0.0
        for name in dict.fromkeys([next(iter(known)), largest]):
            t0 = time.perf_counter()
            plan = PrecisionPlan.uniform(graph, "bf16").with_format(name, formats[0]).validate(graph)
            measure(quantized_program(program, plan, stats), base)
            per = max(per, time.perf_counter() - t0)
    names = list(known)
    if full or budget_s is None or (full is None and per * len(names) * len(formats) <= budget_s):
        chosen = names
    else:
        layers = sorted({g.layer for g in known.values() if g.layer is not None})
        per_layer = max(1, len({g.kind for g in known.values() if g.layer is not None}))
        head = [n for n, g in known.items() if g.layer is None]
        fit = int(budget_s // (per * len(formats))) - len(head)
        count = max(1, min(len(layers), fit // per_layer))
        picked = {layers[round(i * (len(layers) - 1) / max(1, count - 1))] for i in range(count)} if layers else set()
        chosen = [n for n, g in known.items() if g.layer in picked or g.layer is None]
    return SweepPlan(chosen, formats, len(names), per, device, budget_s)


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
    ids = probe_ids(ids, window, stride)
    base = reference_logits(program, ids, window=window, stride=stride)
    table = GroupTimes(timings) if timings is not None else None
    from .apply import quantized_program

    measured: dict[str, dict[str, float]] = {}  # plan JSON -> numbers: a row equal to the base plan runs once
    rows = []
    with progress_bar(len(chosen) * len(formats), "sensitivity", "variant", enabled=progress) as bar:
        for name in chosen:
            g = known[name]
            base_ms = table.group_ms(graph, g, "bf16") if table else math.nan
            for fmt in formats:
                options = {k: v for k, v in format_options.items() if k in OPTIONS[fmt]}
                plan = base_plan.with_format(name, fmt, **options).validate(graph)
                key = plan.dumps()
                if key not in measured:
                    measured[key] = measure(quantized_program(program, plan, stats), base)
                quant_ms = table.group_ms(graph, g, fmt, plan.options(name)) if table else math.nan
                rows.append({"group": name, "layer": g.layer, "kind": g.kind, "format": fmt, **measured[key],
                             "base_ms": base_ms, "quant_ms": quant_ms, "saved_ms": base_ms - quant_ms})
                bar.set_postfix_str(f"{name} {fmt}")
                bar.update(1)
    return SensitivityReport(_frame(rows), base.ppl, formats, model_fingerprint(graph), window, stride, ids.numel())


# ---- figure -----------------------------------------------------------------------------------------------

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
